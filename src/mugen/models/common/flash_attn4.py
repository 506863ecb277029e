"""Optional FlashAttention-4 (CuTe DSL) attention, as torch custom ops (seed §5.3: attention kernels).

MUG-DiT's head dim is 72. Torch's SDPA backends run it in 128-wide tiles on Hopper (cuDNN reached
~337 TFLOP/s on the 10B release shapes, benchmarks/results/mugv_10b_i2v.md), which leaves attention
as the floor of every speed target. FlashAttention-4 (the ``flash-attn-4`` package, a CuTe DSL
kernel library with Hopper forward and backward kernels, JIT-compiled on first use) picks tiles for
head dims up to 96 instead. mugen never requires it: it is used only when asked for
(``MUGEN_SDPA_BACKEND=fa4`` or ``ScaledDotProductAttention(backend="fa4")``) and only for bf16/fp16
attention on a CUDA GPU of compute capability 9.0 or newer, unmasked or with a key-padding mask (the
cross-attention to padded text); every other call (other masks, CPU, fp32) goes through SDPA as before.

The kernels are wrapped as ``torch.library`` custom ops with fake (meta) implementations and a
registered backward, so compiled blocks (``torch.compile``) keep them as single graph nodes instead
of tracing into the DSL. Layout here is FlashAttention's: ``(B, tokens, heads, head_dim)``.
Tested with flash-attn-4 4.0.0b12 and nvidia-cutlass-dsl 4.4.2 on an H100 (the ``fa4`` extra pins them), through
its ``flash_attn.cute.interface`` forward/backward entry points.
"""

from __future__ import annotations

import functools
import math
import os
from types import ModuleType

import torch
from torch import Tensor

from mugen.errors import MugenError

TESTED_VERSION = "flash-attn-4 4.0.0b12 with nvidia-cutlass-dsl 4.4.2"


@functools.lru_cache(maxsize=1)
def _interface() -> ModuleType:
    """``flash_attn.cute.interface`` with its Hopper dq fixed where needed, or a clear error saying how to get it."""
    try:
        from flash_attn.cute import interface
    except ImportError as error:
        raise MugenError(
            "attention backend 'fa4' needs FlashAttention-4: `pip install \"mugen[fa4]\"` or `pip install flash-attn-4` "
            f"(tested: {TESTED_VERSION}), or choose another backend "
            f"(MUGEN_SDPA_BACKEND=auto). Import failed with: {error}"
        ) from error
    global _BACKWARD_DQ_ALIGNED
    _BACKWARD_DQ_ALIGNED = align_hopper_backward_dq(interface)
    return interface


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# Whether the Hopper backward returns the right dq at every head dim that is a multiple of 8 (set by
# _interface(): True once align_hopper_backward_dq fixed or found fixed the dq accumulator layout).
_BACKWARD_DQ_ALIGNED = False
_PERSISTENT_CACHE_VARIABLE = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"


def align_hopper_backward_dq(interface: ModuleType) -> bool:
    """Make the Hopper backward's dq accumulator layout agree with its allocation; True when it does.

    flash-attn-4 4.0.0b12's SM90 backward kernel tiles the head dim in multiples of 16 (72 -> 80) while
    ``_flash_attn_bwd`` allocates the float32 dq accumulator, and its pre/postprocess kernels read it, in
    multiples of 32 (72 -> 96). Where the two differ (head dims 72, 80, 104, 112 with the un-swapped dK/dV
    layout) the postprocess reads dq from the wrong offsets: dq came back with relative error ~1 on an H100,
    dk and dv right (benchmarks/results/fa4_attention.md; upstream pull request Dao-AILab/flash-attention#2896
    describes the same mismatch). The kernel class is replaced by a subclass that tiles in multiples of 32
    there, which reads the operands with the same out-of-bounds predication it uses for 80. Returns False,
    leaving the library alone (the backward then pads operands to a verified head dim), when the interface
    has no Hopper backward class, or when flash-attn's persistent kernel cache is on: its keys do not see
    this change, so a kernel compiled without it could be loaded from disk.
    """
    original = getattr(interface, "FlashAttentionBackwardSm90", None)
    if original is None:
        return False
    if getattr(original, "mugen_aligned_dq", False):
        return True
    probe = original(interface.cutlass.BFloat16, 72, 72)
    if probe.tile_hdim == _round_up(72, 32):  # a release that already agrees
        return True
    if probe.tile_hdim != _round_up(72, 16) or os.environ.get(_PERSISTENT_CACHE_VARIABLE, "0") == "1":
        return False  # a layout this fix was not written for, or kernels on disk compiled without it

    class AlignedDQBackwardSm90(original):
        mugen_aligned_dq = True

        def __init__(self, dtype, head_dim: int, head_dim_v: int | None = None, *args, **kwargs):
            super().__init__(dtype, head_dim, head_dim_v, *args, **kwargs)
            if self.dKV_swapAB:  # that layout rounds differently; head dims <= 128 never take it
                return
            head_dim_v = head_dim if head_dim_v is None else head_dim_v
            self.tile_hdim, self.tile_hdimv = _round_up(head_dim, 32), _round_up(head_dim_v, 32)
            self.check_hdim_oob, self.check_hdim_v_oob = head_dim != self.tile_hdim, head_dim_v != self.tile_hdimv
            self.shuffle_LSE = self.shuffle_dPsum = self.SdP_swapAB and self.tile_hdim <= 64

    interface.FlashAttentionBackwardSm90 = AlignedDQBackwardSm90
    compiled = getattr(getattr(interface, "_flash_attn_bwd", None), "compile_cache", None)
    if compiled is not None and hasattr(compiled, "clear"):
        compiled.clear()  # kernels built before the fix (by other code in this process) are not reused
    return True


def fa4_available() -> bool:
    try:
        _interface()
    except MugenError:
        return False
    return True


@torch.library.custom_op("mugen::fa4_attention_forward", mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, keys_used: Tensor | None) -> tuple[Tensor, Tensor]:
    # q (B, N, H, D), k/v (B, L, H, D), keys_used (B,) int32 or None -> out (B, N, H, Dv), lse (B, H, N) float32
    # keys_used[b]: sample b attends to its first keys_used[b] keys only (FlashAttention's seqused_k)
    result = _interface()._flash_attn_fwd(
        q, k, v, seqused_k=keys_used, softmax_scale=softmax_scale, causal=False, return_lse=True
    )
    return result[0].contiguous(), result[1].contiguous()  # the layouts the fake promises


@_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, keys_used: Tensor | None) -> tuple[Tensor, Tensor]:
    batch, tokens, heads, _ = q.shape
    return q.new_empty(batch, tokens, heads, v.shape[-1]), q.new_empty((batch, heads, tokens), dtype=torch.float32)


BACKWARD_HEAD_DIMS = (64, 96, 128)  # head dims whose unpatched Hopper backward matched fp32 math on an H100


def backward_head_dim(head_dim: int) -> int:
    """The head dim the backward runs at: ``head_dim`` itself when the dq layout is aligned
    (``align_hopper_backward_dq``) or the head dim verified, else the next verified one."""
    if _BACKWARD_DQ_ALIGNED:
        return head_dim
    for verified in BACKWARD_HEAD_DIMS:
        if head_dim <= verified:
            return verified
    return head_dim


def _pad_last(t: Tensor, size: int) -> Tensor:
    """``t`` (..., d) zero-padded to (..., size), contiguous."""
    if t.shape[-1] == size:
        return t.contiguous()
    return torch.nn.functional.pad(t, (0, size - t.shape[-1])).contiguous()


@torch.library.custom_op("mugen::fa4_attention_backward", mutates_args=())
def _backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor, lse: Tensor, softmax_scale: float, keys_used: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    # Unless align_hopper_backward_dq fixed the library's dq layout, flash-attn-4 4.0.0b12's Hopper
    # backward returns a wrong dq at head dims 72 and 80 (right at 64, 96, 128). Zero columns change
    # neither the scores nor the softmax, so the backward then runs on operands padded to a head dim it
    # gets right, and the padding is cut off the gradients.
    interface = _interface()  # first, so that backward_head_dim knows whether the layout is aligned
    head_dim = q.shape[-1]
    padded = backward_head_dim(head_dim)
    inputs = (q, k, v)
    if padded != head_dim:
        q, k, v, out, grad_out = (_pad_last(t, padded) for t in (q, k, v, out, grad_out))
    # With seqused_k the kernel writes dk and dv only for each sample's used keys: the rows of the unused (padded)
    # keys must start at zero, or they keep whatever the allocator handed out (seen on an H100: gradients of
    # relative error ~1 and a training run that diverged at its first step).
    unused_key_rows = {} if keys_used is None else {"dk": torch.zeros_like(k), "dv": torch.zeros_like(v)}
    grads = interface._flash_attn_bwd(
        q, k, v, out, grad_out, lse, softmax_scale, False, seqused_k=keys_used, **unused_key_rows
    )[:3]
    # each gradient in the strides of its input, as the fake promises (the kernel's own choice when unpadded:
    # it allocates them with torch.empty_like, so no copy is made then)
    return tuple(_in_strides_of(t, g if g.shape[-1] == head_dim else g[..., :head_dim]) for t, g in zip(inputs, grads))


def _in_strides_of(like: Tensor, values: Tensor) -> Tensor:
    """``values`` in the strides ``torch.empty_like(like)`` has (copied only when they differ)."""
    result = torch.empty_like(like)  # from the caching allocator: no kernel, freed at once when unused
    if values.stride() == result.stride():
        return values
    return result.copy_(values)


@_backward.register_fake
def _(q, k, v, out, grad_out, lse, softmax_scale, keys_used):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, softmax_scale, keys_used = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, keys_used)
    ctx.softmax_scale = softmax_scale


def _autograd_backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, keys_used = ctx.saved_tensors
    grad_q, grad_k, grad_v = _backward(q, k, v, out, grad_out, lse, ctx.softmax_scale, keys_used)
    return grad_q, grad_k, grad_v, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def fa4_attention(
    q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None, key_padding_mask: Tensor | None = None
) -> Tensor:
    """``softmax(q k^T * scale) v`` on FlashAttention-4 kernels, optionally over the kept keys only.

    q (B, N, heads, hd), k/v (B, L, heads, hd) in bf16 or fp16, key_padding_mask (B, L) bool (True = attend;
    the cross-attention's padded text) -> (B, N, heads, hd). Attention does not depend on the order of the
    keys, so each sample's kept keys are moved to the front (a stable sort of the mask, gathered on the GPU:
    no host sync, fixed shapes for compiled blocks) and the kernel reads the first ``mask.sum()`` of them.
    """
    if q.dim() != 4 or k.shape != v.shape[:-1] + (k.shape[-1],) or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise MugenError(f"fa4_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not (B, tokens, heads, head_dim) alike")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    keys_used = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != k.shape[:2] or key_padding_mask.dtype != torch.bool:
            raise MugenError(
                f"fa4_attention: key_padding_mask {tuple(key_padding_mask.shape)} {key_padding_mask.dtype} must be "
                f"bool (B, L) = {tuple(k.shape[:2])}"
            )
        order = torch.argsort((~key_padding_mask).to(torch.int8), dim=1, stable=True)  # (B, L): kept keys first
        index = order[:, :, None, None].expand_as(k)
        k, v = k.gather(1, index), v.gather(1, index)
        keys_used = key_padding_mask.sum(dim=1, dtype=torch.int32)  # (B,)
    out, _ = _forward(q, k, v, scale, keys_used)
    return out


def key_padding_mask_of(attn_mask: Tensor | None, batch: int, keys: int) -> Tensor | None:
    """The (B, L) bool mask when ``attn_mask`` is a key-padding mask (bool, (B, 1, 1, L)), else None."""
    if attn_mask is None or attn_mask.dtype != torch.bool or attn_mask.shape != (batch, 1, 1, keys):
        return None
    return attn_mask.reshape(batch, keys)


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in the autocast dtype when autocast is on for their device (what SDPA does to its inputs).

    Under ``torch.autocast`` the torch path's q/k come out of the fp32 norms and RoPE in float32; SDPA casts
    them to bf16 itself, a custom op does not, so the ``fa4`` route casts them first.
    """
    device_type = tensors[0].device.type
    if not tensors[0].is_floating_point() or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def fa4_applies(q: Tensor, attn_mask: Tensor | None, keys: int | None = None) -> bool:
    """Whether a call can run on FlashAttention-4: unmasked or with a (B, 1, 1, L) bool key-padding mask, half
    precision, CUDA compute capability >= 9.0."""
    if attn_mask is not None and key_padding_mask_of(attn_mask, q.shape[0], attn_mask.shape[-1] if keys is None else keys) is None:
        return False
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] % 8:
        return False
    return torch.cuda.get_device_capability(q.device) >= (9, 0)
