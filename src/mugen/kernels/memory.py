"""Activation-memory savers for the fused path (seed §5.3; no recomputation of whole blocks).

Two torch ``autograd.Function``s that keep less for the backward pass than autograd would, and
recompute cheap elementwise work instead (the matmuls are never recomputed):

- :func:`rms_norm` keeps only its input (autograd keeps the fp32 upcast, the normalised tensor and
  the product: about six bf16-sized copies) - used for the cross-attention QK-norm; a Triton kernel
  for contiguous inputs, a torch Function otherwise;
- :func:`gelu_linear` ``linear(gelu_tanh(u), W)`` keeps ``u`` and recomputes the GELU in the
  backward pass instead of also keeping its 4d-wide output (the MLP's fc2 input).

Memory, not bandwidth, is what they are for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import mugen.kernels as kernels


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm in fp32, rounded back to x's dtype, times the weight (``mugen.models.common.layers.rms_norm``)."""
    x_fp32 = x.float()
    normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return rms_norm_reference(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        x_fp32 = x.float()
        rstd = torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + ctx.eps)
        normed = x_fp32 * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.float() * normed.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_normed = grad.float() * weight.float()
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim; keeps only x for the backward pass when the kernels are on.
    Contiguous x: one Triton pass each way; otherwise (e.g. the k half of a kv projection) the
    torch Function above."""
    if not kernels.use_kernels(x):
        return rms_norm_reference(x, weight, eps)
    if x.is_contiguous():
        from mugen.kernels.triton_kernels import RMSNormTritonFunction

        return RMSNormTritonFunction.apply(x, weight, eps, torch.promote_types(x.dtype, weight.dtype))
    return RMSNormFunction.apply(x, weight, eps)


def gelu_linear_reference(u: Tensor, weight: Tensor) -> Tensor:
    """``linear(gelu_tanh(u), weight)`` without bias: u (..., hidden), weight (out, hidden)."""
    return F.linear(F.gelu(u, approximate="tanh"), weight)


class GeluLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, weight):
        ctx.save_for_backward(u, weight)
        return F.linear(F.gelu(u, approximate="tanh"), weight)

    @staticmethod
    def backward(ctx, grad):
        u, weight = ctx.saved_tensors
        activation = F.gelu(u, approximate="tanh")  # recomputed: one elementwise pass
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ activation.reshape(-1, activation.shape[-1])
        grad_activation = grad @ weight
        grad_u = torch.ops.aten.gelu_backward(grad_activation, u, approximate="tanh")
        return grad_u, grad_weight


def gelu_linear(u: Tensor, weight: Tensor) -> Tensor:
    """``linear(gelu_tanh(u), weight)``; keeps u, not the GELU output, when the kernels are on.
    Under autocast the matmul runs in the autocast dtype, as ``F.linear`` would."""
    if not kernels.use_kernels(u):
        return gelu_linear_reference(u, weight)
    device_type = u.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        u, weight = u.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return GeluLinearFunction.apply(u, weight)
    if u.dtype != weight.dtype:
        raise ValueError(f"gelu_linear needs one dtype outside autocast, got {u.dtype} and {weight.dtype}")
    return GeluLinearFunction.apply(u, weight)
