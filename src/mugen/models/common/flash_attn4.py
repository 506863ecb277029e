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
from types import ModuleType

import torch
from torch import Tensor

from mugen.errors import MugenError

TESTED_VERSION = "flash-attn-4 4.0.0b12 with nvidia-cutlass-dsl 4.4.2"


@functools.lru_cache(maxsize=1)
def _interface() -> ModuleType:
    """``flash_attn.cute.interface``, or a clear error saying how to get it."""
    try:
        from flash_attn.cute import interface
    except ImportError as error:
        raise MugenError(
            "attention backend 'fa4' needs FlashAttention-4: `pip install \"mugen[fa4]\"` or `pip install flash-attn-4` "
            f"(tested: {TESTED_VERSION}), or choose another backend "
            f"(MUGEN_SDPA_BACKEND=auto). Import failed with: {error}"
        ) from error
    return interface


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


BACKWARD_HEAD_DIMS = (64, 96, 128)  # head dims whose Hopper backward matched fp32 math on an H100


def backward_head_dim(head_dim: int) -> int:
    """The head dim the backward runs at: ``head_dim`` itself when verified, else the next verified one."""
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
    # The Hopper backward of flash-attn-4 4.0.0b12 returned a wrong dq (relative error ~1) for head
    # dims 72 and 80 on an H100, right ones for 64, 96 and 128 (benchmarks/results/fa4_attention.md).
    # Zero columns change neither the scores nor the softmax, so the backward runs on operands padded
    # to a head dim it gets right, and the padding is cut off the gradients.
    head_dim = q.shape[-1]
    padded = backward_head_dim(head_dim)
    q, k, v, out, grad_out = (_pad_last(t, padded) for t in (q, k, v, out, grad_out))
    result = _interface()._flash_attn_bwd(q, k, v, out, grad_out, lse, softmax_scale, False, seqused_k=keys_used)
    return tuple(g[..., :head_dim].contiguous() for g in result[:3])


@_backward.register_fake
def _(q, k, v, out, grad_out, lse, softmax_scale, keys_used):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous


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
