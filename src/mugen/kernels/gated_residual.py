"""(a) Bias + gated residual add, ``x + gate * (y + bias)`` (seed §5.3 kernel fusion).

``y`` is the output of ``attn.proj`` or ``mlp.fc2`` computed without its bias; the bias add, the
gate multiply and the residual add become one pass over the tokens (three in the torch path, plus
the bias add inside the linear layer). The gate is either the sample's (B, d) gate for every token,
or chosen per token between the sample's gate and the t = 0 gate by ``use_t0`` (B, T) (conditioned
frames and the start/end tokens, see ``select_modulation`` in ``mugen.models.dit.model``).
"""

from __future__ import annotations

import torch
from torch import Tensor

import mugen.kernels as kernels


def _per_token(param: Tensor, param_t0: Tensor | None, use_t0: Tensor | None) -> Tensor:
    """(B, d) parameters -> (B, 1, d), or (B, T, d) chosen per token by ``use_t0`` (B, T)."""
    batch, dim = param.shape[0], param.shape[-1]
    param = param.reshape(batch, 1, dim)
    if use_t0 is None:
        return param
    return torch.where(use_t0[..., None], param_t0.reshape(batch, 1, dim), param)


def gated_residual_reference(
    x: Tensor, y: Tensor, bias: Tensor | None, gate: Tensor, gate_t0: Tensor | None = None, use_t0: Tensor | None = None
) -> Tensor:
    """Torch reference. x, y (B, T, d); bias (d,) or None; gate, gate_t0 (B, d) or (B, 1, d); use_t0 (B, T) bool."""
    if bias is not None:
        y = y + bias
    return x + _per_token(gate, gate_t0, use_t0) * y


def gated_residual(
    x: Tensor, y: Tensor, bias: Tensor | None, gate: Tensor, gate_t0: Tensor | None = None, use_t0: Tensor | None = None
) -> Tensor:
    """Fused ``x + gate * (y + bias)`` when :func:`mugen.kernels.use_kernels` says so, else the reference."""
    if (use_t0 is None) != (gate_t0 is None):
        raise ValueError("gate_t0 and use_t0 go together: pass both or neither")
    if not kernels.use_kernels(x):
        return gated_residual_reference(x, y, bias, gate, gate_t0, use_t0)
    from mugen.kernels.triton_kernels import GatedResidualFunction

    inputs = [x, y, gate] + ([bias] if bias is not None else [])
    out_dtype = kernels.output_dtype(*inputs, autocast_to_low=False)
    return GatedResidualFunction.apply(x, y, bias, gate, gate_t0, use_t0, out_dtype)
