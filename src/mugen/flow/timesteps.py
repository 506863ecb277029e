"""Rectified-flow time: the resolution/duration shift, training draws and the sampling grid.

Convention (DESIGN.md "Tensor and time conventions", as in the official MUG-V release):
``x_t = (1 - t) x0 + t eps`` with t in [0, 1] and t = 1 pure noise.

Larger and longer clips hold more redundant signal, so the same t destroys less of them; the
shift ``t' = r t / (1 + (r - 1) t)`` moves every t towards the noisy end by the ratio
``r = sqrt(H W / 512^2) * sqrt(T_latent)`` (pixel H, W; T_latent latent frames, 1 for images).
Training draws t from a logit-normal(0, 1) and shifts it; the sampler shifts its uniform grid with
the same ratio, so training and sampling spend their effort at the same noise levels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mugen.errors import MugenError


def resolution_shift_ratio(height: int, width: int, latent_frames: int, base_resolution: int = 512 * 512) -> float:
    """Shift ratio ``r = sqrt(height * width / base_resolution) * sqrt(latent_frames)``.

    ``height`` and ``width`` are in pixels; ``latent_frames`` counts latent frames (1 for images).
    A 512x512 image gives 1.0 (no shift).
    """
    for name, value in (("height", height), ("width", width), ("latent_frames", latent_frames)):
        if int(value) != value or value < 1:
            raise MugenError(f"shift ratio: {name}={value!r} must be a positive whole number")
    if base_resolution <= 0:
        raise MugenError(f"shift ratio: base_resolution={base_resolution!r} must be positive (pixels, e.g. 512 * 512)")
    return math.sqrt(height * width / base_resolution) * math.sqrt(latent_frames)


def _check_ratio(ratio: float | Tensor) -> None:
    if isinstance(ratio, Tensor):
        if not bool(torch.isfinite(ratio).all()) or not bool((ratio > 0).all()):
            raise MugenError("shift ratio: every entry of the ratio tensor must be finite and positive")
    elif not math.isfinite(ratio) or ratio <= 0:
        raise MugenError(f"shift ratio: ratio={ratio!r} must be finite and positive (1.0 = no shift)")


def shift_timesteps(t: Tensor, ratio: float | Tensor) -> Tensor:
    """Apply ``t' = r t / (1 + (r - 1) t)`` elementwise.

    ``ratio`` is a float or a tensor that broadcasts against ``t`` (e.g. one ratio per sample, (B,)
    against t (B,)). The map fixes 0 and 1, is increasing in t, and is the identity for r = 1.
    """
    _check_ratio(ratio)
    if isinstance(ratio, Tensor):
        ratio = ratio.to(device=t.device, dtype=t.dtype)
    # r t / (r t + 1 - t) equals r t / (1 + (r - 1) t) and keeps t = 0 and t = 1 exact in floating point
    scaled = ratio * t
    return scaled / (scaled + (1 - t))


def sample_training_timesteps(
    batch_size: int,
    ratio: float | Tensor,
    generator: torch.Generator | None = None,
    device=None,
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """Draw training times: ``shift(sigmoid(mean + std * n), ratio)`` with n standard normal.

    Returns (batch_size,) float32 in (0, 1). ``ratio`` is a float or a (batch_size,) tensor (one
    ratio per sample). Normals are drawn on the generator's device (so a seeded CPU generator gives
    the same times everywhere), then moved to ``device``. Each rank should pass its own generator.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise MugenError(f"training timesteps: batch_size={batch_size!r} must be a positive whole number")
    if not std > 0:
        raise MugenError(f"training timesteps: std={std!r} must be positive (logit-normal scale, 1.0 by default)")
    if isinstance(ratio, Tensor) and ratio.dim() > 0 and tuple(ratio.shape) != (batch_size,):
        raise MugenError(
            f"training timesteps: ratio has shape {tuple(ratio.shape)}, expected a float or ({batch_size},) "
            "with one ratio per sample"
        )
    draw_device = generator.device if generator is not None else (device if device is not None else "cpu")
    normal = torch.randn(batch_size, generator=generator, device=draw_device, dtype=torch.float32)  # (B,)
    t = torch.sigmoid(mean + std * normal)  # logit-normal(mean, std)
    if device is not None:
        t = t.to(device)
    return shift_timesteps(t, ratio)


def sampling_schedule(num_steps: int, ratio: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """Time grid for an Euler sampler: (num_steps + 1,), from exactly 1 down to exactly 0.

    The uniform grid ``t_i = 1 - i / num_steps`` for i = 0 .. num_steps - 1 is shifted with
    ``ratio``, then a final 0 is appended (the last step lands on clean data). Computed in float64
    by default so that long schedules keep exact endpoints and step sizes.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise MugenError(f"sampling schedule: num_steps={num_steps!r} must be a positive whole number")
    uniform = 1.0 - torch.arange(num_steps, dtype=torch.float64) / num_steps  # (N,) 1 .. 1/N
    shifted = shift_timesteps(uniform, float(ratio))  # (N,)
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float64)]).to(dtype)  # (N + 1,)
