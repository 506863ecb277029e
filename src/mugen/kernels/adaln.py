"""(b) LayerNorm (no affine) + adaLN modulation, ``LN(x) * (1 + scale) + shift`` (seed §3.2, §5.3).

One pass reads x once and writes the modulated activations in the dtype the next linear layer
computes in (bf16 under autocast), instead of LayerNorm, a multiply and an add over fp32 tensors.
Per token, (shift, scale) is the sample's pair or the t = 0 pair, chosen by ``use_t0`` (B, T): the
conditioned frames and the start/end tokens of MUG-DiT take the t = 0 modulation (seed §3.2
"Image/frame conditioning").
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

import mugen.kernels as kernels
from mugen.kernels.gated_residual import _per_token


def layernorm_modulate_reference(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    shift_t0: Tensor | None = None,
    scale_t0: Tensor | None = None,
    use_t0: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Torch reference. x (B, T, d); shift, scale, shift_t0, scale_t0 (B, d) or (B, 1, d); use_t0 (B, T) bool."""
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)
    return normed * (1 + _per_token(scale, scale_t0, use_t0)) + _per_token(shift, shift_t0, use_t0)


def layernorm_modulate(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    shift_t0: Tensor | None = None,
    scale_t0: Tensor | None = None,
    use_t0: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Fused LayerNorm + modulation; under autocast the output is in the autocast dtype (the next
    layer is a linear layer that would cast it anyway)."""
    if (use_t0 is None) != (shift_t0 is None) or (shift_t0 is None) != (scale_t0 is None):
        raise ValueError("shift_t0, scale_t0 and use_t0 go together: pass all three or none")
    if not kernels.use_kernels(x):
        return layernorm_modulate_reference(x, shift, scale, shift_t0, scale_t0, use_t0, eps)
    from mugen.kernels.triton_kernels import LayerNormModulateFunction

    out_dtype = kernels.output_dtype(x, shift, scale, autocast_to_low=True)
    return LayerNormModulateFunction.apply(x, shift, scale, shift_t0, scale_t0, use_t0, eps, out_dtype)
