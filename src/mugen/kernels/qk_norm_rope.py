"""(c) QK RMSNorm + 3D RoPE straight from the qkv projection (seed §3.2, §5.3).

The torch path splits q, k, v, normalises q and k in fp32 (RMSNorm, rounded back to the input dtype,
then the weight), casts to fp32 again for the complex RoPE multiply and back: about ten passes over
q and k. The kernel reads each head vector once, normalises and rotates it in registers and writes
q, k and v as (B, heads, N, hd) tensors (contiguous by default, see ``QKV_LAYOUT`` in
``triton_kernels``; cuDNN attention runs faster on them than on transposed views).
"""

from __future__ import annotations

import torch
from torch import Tensor

import mugen.kernels as kernels
from mugen.kernels.memory import rms_norm_reference as rms_norm
from mugen.models.common.rope import apply_rope


def qk_norm_rope_reference(
    qkv: Tensor, q_weight: Tensor, k_weight: Tensor, rotations: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """Torch reference: qkv (B, N, 3, heads, hd); RMSNorm weights (hd,); rotations (B, 1, N, hd/2)
    complex. Returns q, k, v, each (B, heads, N, hd), exactly as ``SelfAttention`` computes them."""
    q, k, v = qkv.unbind(2)  # each (B, N, heads, hd)
    q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    q, k, v = (tensor.transpose(1, 2) for tensor in (q, k, v))  # (B, heads, N, hd)
    return apply_rope(q, rotations), apply_rope(k, rotations), v


def qk_norm_rope(
    qkv: Tensor, q_weight: Tensor, k_weight: Tensor, rotations: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused QK RMSNorm + RoPE (+ v in the same layout); under autocast q, k, v come out in the
    autocast dtype (SDPA would cast them anyway)."""
    if not kernels.use_kernels(qkv):
        return qk_norm_rope_reference(qkv, q_weight, k_weight, rotations, eps)
    from mugen.kernels.triton_kernels import QKNormRopeFunction

    batch, tokens, three, heads, head_dim = qkv.shape
    if three != 3 or head_dim % 2:
        raise ValueError(f"qkv must be (B, N, 3, heads, hd) with an even hd, got {tuple(qkv.shape)}")
    # (B, 1, N, hd/2) complex -> (B', N, hd/2, 2) float32 (cos, sin); B' is 1 or B (broadcast).
    cos_sin = torch.view_as_real(rotations.squeeze(1).to(torch.complex64))
    if cos_sin.shape[0] == 1 and batch > 1:
        cos_sin = cos_sin.expand(batch, -1, -1, -1)
    out_dtype = kernels.output_dtype(qkv, q_weight, autocast_to_low=True)
    return QKNormRopeFunction.apply(qkv, q_weight, k_weight, cos_sin, eps, out_dtype)  # 3 x (B, heads, N, hd)
