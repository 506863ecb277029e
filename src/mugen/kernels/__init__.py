"""Fused Triton kernels for MUG-DiT (seed §5.3 "kernel fusion").

Three fusions, each an ``autograd.Function`` with Triton forward and backward, next to a plain torch
reference that states the math:

- :func:`gated_residual` ``x + gate * (y + bias)`` (the bias of ``attn.proj`` / ``mlp.fc2`` moves into
  the residual epilogue);
- :func:`layernorm_modulate` ``LN(x) * (1 + scale) + shift`` with a per-token choice between the
  sample's (shift, scale) and the t = 0 pair (conditioned frames, start/end tokens);
- :func:`qk_norm_rope` RMSNorm of q and k, then 3D RoPE, straight from the qkv projection.

and two torch Functions that keep less activation memory (:mod:`mugen.kernels.memory`):
:func:`rms_norm` (cross-attention QK-norm) and :func:`gelu_linear` (GELU recomputed in fc2's backward).

Switch: ``MUGEN_KERNELS=0`` in the environment, :func:`set_enabled`, or the :func:`enabled` context
manager. The default (``None``, "auto") uses the kernels for CUDA tensors when Triton is importable,
and never for CPU tensors; ``True`` forces them, also on the CPU where it needs ``TRITON_INTERPRET=1``
set before Triton is first imported (the tests do this). Inside ``torch.compile`` the torch path is
traced instead: inductor generates its own fused kernels there.

The kernel modules are imported lazily, on the first fused call, because Triton decides between
compiling and interpreting when a kernel is defined.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torch.distributed.tensor import DTensor

from mugen.errors import MugenError

_ENABLED: bool | None = None if os.environ.get("MUGEN_KERNELS", "").strip() not in ("0", "false", "off") else False


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def set_enabled(flag: bool | None) -> None:
    """``True``: always fuse; ``False``: never; ``None``: fuse CUDA tensors when Triton is available."""
    global _ENABLED
    _ENABLED = flag


def is_enabled() -> bool | None:
    return _ENABLED


@contextlib.contextmanager
def enabled(flag: bool | None):
    """Context manager form of :func:`set_enabled`; restores the previous setting on exit."""
    previous = _ENABLED
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


def use_kernels(tensor: torch.Tensor) -> bool:
    """Whether the fused path should run for ``tensor`` under the current setting (never for a
    DTensor: the kernels take local tensors)."""
    if _ENABLED is False or torch.compiler.is_compiling() or isinstance(tensor, DTensor):
        return False
    if _ENABLED is None:
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise MugenError("mugen.kernels are forced on but Triton is not installed; pip install triton or set_enabled(None)")
    if not tensor.is_cuda and not interpreting():
        raise MugenError(
            "mugen.kernels are forced on for a CPU tensor; set TRITON_INTERPRET=1 before importing triton "
            "(slow, for tests) or use set_enabled(None) to fuse on CUDA only"
        )
    return True


def output_dtype(*tensors: torch.Tensor, autocast_to_low: bool) -> torch.dtype:
    """The dtype the torch reference would produce: type promotion of the inputs, or the autocast
    dtype when autocast is on and the consumer (a linear layer, SDPA) would cast to it anyway."""
    device_type = tensors[0].device.type
    if autocast_to_low and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


from mugen.kernels.adaln import layernorm_modulate, layernorm_modulate_reference  # noqa: E402
from mugen.kernels.gated_residual import gated_residual, gated_residual_reference  # noqa: E402
from mugen.kernels.memory import gelu_linear, gelu_linear_reference, rms_norm, rms_norm_reference  # noqa: E402
from mugen.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference  # noqa: E402

__all__ = [
    "enabled",
    "gated_residual",
    "gated_residual_reference",
    "gelu_linear",
    "gelu_linear_reference",
    "interpreting",
    "is_enabled",
    "layernorm_modulate",
    "layernorm_modulate_reference",
    "qk_norm_rope",
    "qk_norm_rope_reference",
    "rms_norm",
    "rms_norm_reference",
    "set_enabled",
    "triton_available",
    "use_kernels",
]
