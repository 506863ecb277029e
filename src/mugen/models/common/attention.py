"""The attention call of mugen's transformers, as a replaceable module, with a per-device backend.

``SelfAttention.attention_op`` and ``CrossAttention.attention_op`` hold a parameter-free
:class:`ScaledDotProductAttention`. Parallelism applied from outside the model swaps it (e.g. for
ring attention over a context-parallel group) without touching the model code or its state dict.
The contract: ``forward(q, k, v, attn_mask=None) -> out``, all ``(B, heads, tokens, head_dim)``.

SDPA backend (seed §5.3; MUG-DiT's head dim is 72): on Hopper GPUs cuDNN's fused attention runs
head dim 72 about 1.5x faster than the flash backend (benchmarks/results/dit_block.md), so
``"auto"`` prefers cuDNN there, then flash, memory-efficient and math (SDPA falls through to the
next one that supports the inputs). That includes the masked cross-attention to padded text, where
torch's own choice (memory-efficient) cost ~110 ms more per 1B training step than cuDNN
(benchmarks/results/dit_1b_train_step.md). Elsewhere ``"auto"`` keeps torch's choice. Choose with
``MUGEN_SDPA_BACKEND`` (``auto``, ``default``, ``cudnn``, ``flash``, ``efficient``, ``math``),
:func:`set_sdpa_backend`, or per module (``ScaledDotProductAttention(backend="flash")``). A named
backend is tried first for every call and the others follow as fall-backs; ``default`` leaves the
choice to torch entirely. ``fa4`` runs unmasked half-precision attention on Hopper or newer through the
optional FlashAttention-4 kernels (``mugen.models.common.flash_attn4``, ``pip install flash-attn-4``),
also with a key-padding mask (the cross-attention to padded text), and everything else like ``cudnn``.

cuDNN's backward is handed a gradient with the output's own strides (one copy when they differ):
with heads-first q/k/v, the merged-heads reshape gives a gradient in another layout, and the cuDNN
backward of torch 2.11 returned wrong dq/dk for it on an H100 (measured in bench_dit_block.py).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mugen.errors import MugenError

_ORDER = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
SDPA_BACKENDS = ("auto", "default", *_ORDER, "fa4")
_BACKEND = os.environ.get("MUGEN_SDPA_BACKEND", "auto").strip().lower() or "auto"


def _check(name: str) -> str:
    if name not in SDPA_BACKENDS:
        raise MugenError(f"SDPA backend {name!r} is unknown (MUGEN_SDPA_BACKEND or set_sdpa_backend); choose one of {', '.join(SDPA_BACKENDS)}")
    return name


def set_sdpa_backend(name: str) -> None:
    """Default backend of every :class:`ScaledDotProductAttention` without its own ``backend``."""
    global _BACKEND
    _BACKEND = _check(name)


def get_sdpa_backend() -> str:
    return _check(_BACKEND)


@functools.lru_cache(maxsize=None)
def _is_hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def backend_priority(name: str, device: torch.device) -> list[SDPBackend] | None:
    """The SDPA backends to try, in order, for ``name`` on ``device``; None = torch's default."""
    if device.type != "cuda" or name == "default":
        return None
    if name == "fa4":
        name = "cudnn"  # the calls FlashAttention-4 does not take (masked, fp32) go to cuDNN first
    if name == "auto":
        if not _is_hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device()):
            return None
        name = "cudnn"
    first = _ORDER[name]
    return [first] + [backend for backend in _ORDER.values() if backend != first]


class _GradientLikeOutput(torch.autograd.Function):
    """Identity whose backward returns the gradient with the forward output's strides."""

    @staticmethod
    def forward(ctx, out: Tensor) -> Tensor:
        ctx.strides = out.stride()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if grad.stride() == ctx.strides:
            return grad
        matched = torch.empty_strided(grad.shape, ctx.strides, dtype=grad.dtype, device=grad.device)
        return matched.copy_(grad)


class ScaledDotProductAttention(nn.Module):
    """``softmax(q k^T / sqrt(head_dim) + mask) v`` through torch SDPA (no parameters)."""

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = None if backend is None else _check(backend)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        # q (B, heads, N, hd), k/v (B, heads, L, hd), attn_mask broadcastable to (B, heads, N, L)
        name = self.backend or get_sdpa_backend()
        if name == "fa4":
            from mugen.models.common.flash_attn4 import autocast_inputs, fa4_applies, fa4_attention, key_padding_mask_of

            if q.is_cuda:
                q, k, v = autocast_inputs(q, k, v)  # as SDPA would under autocast
            if fa4_applies(q, attn_mask, k.shape[2]):  # FlashAttention's layout is (B, tokens, heads, hd)
                key_mask = key_padding_mask_of(attn_mask, q.shape[0], k.shape[2])
                return fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_padding_mask=key_mask).transpose(1, 2)
        priority = backend_priority(name, q.device)
        if priority is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, hd)
        with sdpa_kernel(priority, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        if priority[0] == SDPBackend.CUDNN_ATTENTION and out.requires_grad and not torch.compiler.is_compiling():
            out = _GradientLikeOutput.apply(out)
        return out

    def extra_repr(self) -> str:
        return f"backend={self.backend or 'default'}"
