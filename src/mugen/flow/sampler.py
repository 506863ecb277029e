"""Euler sampler for rectified flow, with batched classifier-free guidance and frame conditioning.

Walks t from 1 (noise) to 0 (data) on the shifted grid of ``sampling_schedule``:
``z <- z + v(z, t_i) * (t_i - t_{i+1})`` (DESIGN.md "Tensor and time conventions").

Guidance: one forward per step on the doubled batch ``[z, z]``; the caller's ``velocity_fn``
closure gives the first half the prompt and the second half the negative/empty prompt, and
``v = v_uncond + g (v_cond - v_uncond)``.

Frame conditioning (seed §3.2 image conditioning; I2V, TI2V, any frame): frames marked in
``frame_cond_mask`` start from ``cond_latents`` and are reset to them after every step, so they
leave the sampler exactly as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mugen.errors import MugenError
from mugen.flow.objective import VelocityFn, check_frame_cond_mask, frame_mask_5d
from mugen.flow.timesteps import sampling_schedule


@dataclass
class FlowSamplerConfig:
    num_steps: int = 25  # Euler steps from t = 1 to t = 0
    guidance_scale: float = 4.0  # classifier-free guidance; 1.0 = one un-doubled forward per step
    shift_ratio: float = 1.0  # resolution_shift_ratio(...) of the clip being sampled
    show_progress: bool = False  # tqdm bar over the steps


def _check_config(config: FlowSamplerConfig) -> None:
    if int(config.num_steps) != config.num_steps or config.num_steps < 1:
        raise MugenError(f"sampler: num_steps={config.num_steps!r} must be a positive whole number")
    if not math.isfinite(config.guidance_scale):
        raise MugenError(f"sampler: guidance_scale={config.guidance_scale!r} must be finite (1.0 = no guidance)")
    if not math.isfinite(config.shift_ratio) or config.shift_ratio <= 0:
        raise MugenError(f"sampler: shift_ratio={config.shift_ratio!r} must be finite and positive (1.0 = no shift)")


def _check_conditioning(noise: Tensor, cond_latents: Tensor | None, frame_cond_mask: Tensor | None) -> None:
    if noise.dim() != 5:
        raise MugenError(
            f"sampler: noise has shape {tuple(noise.shape)}, expected 5 dims (batch, channels, frames, height, width)"
        )
    if (cond_latents is None) != (frame_cond_mask is None):
        raise MugenError(
            "sampler: cond_latents and frame_cond_mask go together; pass both (clean latents and which frames "
            "they fix) or neither"
        )
    if cond_latents is not None and cond_latents.shape != noise.shape:
        raise MugenError(
            f"sampler: cond_latents has shape {tuple(cond_latents.shape)}, expected the noise shape "
            f"{tuple(noise.shape)} (values on frames that are not conditioned are ignored)"
        )
    check_frame_cond_mask(frame_cond_mask, noise, name="noise")


def _guided_velocity(
    velocity_fn: VelocityFn, z: Tensor, t: Tensor, frame_cond_mask: Tensor | None, guidance_scale: float
) -> Tensor:
    """Velocity at (z, t); with guidance, one forward on the doubled batch [cond half, uncond half]."""
    if guidance_scale == 1.0:
        velocity = velocity_fn(z, t, frame_cond_mask)
        expected = z.shape
    else:
        mask_doubled = None if frame_cond_mask is None else torch.cat([frame_cond_mask, frame_cond_mask])  # (2B, T)
        velocity = velocity_fn(torch.cat([z, z]), torch.cat([t, t]), mask_doubled)  # (2B, C, T, H, W)
        expected = (2 * z.shape[0], *z.shape[1:])
    if velocity.shape != expected:
        raise MugenError(f"sampler: velocity_fn returned shape {tuple(velocity.shape)}, expected {tuple(expected)}")
    if guidance_scale == 1.0:
        return velocity
    velocity_cond, velocity_uncond = velocity.chunk(2)  # (B, C, T, H, W) each
    return velocity_uncond + guidance_scale * (velocity_cond - velocity_uncond)


@torch.no_grad()
def euler_sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    config: FlowSamplerConfig,
    cond_latents: Tensor | None = None,
    frame_cond_mask: Tensor | None = None,
) -> Tensor:
    """Integrate the flow ODE from ``noise`` (t = 1) to a sample (t = 0); returns noise's shape and dtype.

    ``velocity_fn(z, t, frame_cond_mask)`` gets z (B', C, T, H, W), t (B',) in [0, 1] (float64 for
    float64 noise, else float32; the closure scales it to the model's 1000 * t) and the mask
    (B', T) or None, where B' = 2B under guidance. ``cond_latents`` (B, C, T, H, W) and
    ``frame_cond_mask`` (B, T) bool fix the masked frames to clean latents.
    """
    _check_config(config)
    _check_conditioning(noise, cond_latents, frame_cond_mask)
    batch = noise.shape[0]
    time_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    schedule = sampling_schedule(config.num_steps, config.shift_ratio).tolist()  # N + 1 floats, 1 -> 0

    cond_frames = None if frame_cond_mask is None else frame_mask_5d(frame_cond_mask, noise.device)  # (B, 1, T, 1, 1)
    z = noise if cond_frames is None else torch.where(cond_frames, cond_latents.to(noise.dtype), noise)
    for step in tqdm(range(config.num_steps), desc="sampling", disable=not config.show_progress):
        t_now, t_next = schedule[step], schedule[step + 1]
        t = torch.full((batch,), t_now, dtype=time_dtype, device=noise.device)  # (B,)
        velocity = _guided_velocity(velocity_fn, z, t, frame_cond_mask, config.guidance_scale)
        z = z + velocity.to(z.dtype) * (t_now - t_next)
        if cond_frames is not None:
            z = torch.where(cond_frames, cond_latents.to(z.dtype), z)
    return z
