"""Rectified-flow training objective: the noisy path, the velocity target and the per-sample loss.

DESIGN.md "Tensor and time conventions" (the official MUG-V release): ``x_t = (1 - t) x0 + t eps``,
the network predicts ``v = x0 - eps`` (the direction from noise to data, so sampling walks t down
with ``z <- z + v dt``). Conditioning frames (seed §3.2 image conditioning, §4.2.2 first-frame
masking) stay clean in x_t and are left out of the loss.

Losses are returned per sample; the training loop reduces them, which makes loss-by-timestep-bin
logging free (``timestep_bin_losses``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mugen.errors import MugenError

# Official MUG-V training weights image samples (one latent frame) below video samples.
IMAGE_SAMPLE_WEIGHT = 0.3

VelocityFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


@dataclass
class FlowPathSample:
    """One point on the straight path from data to noise, and its velocity target."""

    x_t: Tensor  # (B, C, T, H, W) network input; conditioning frames hold clean x0
    target_velocity: Tensor  # (B, C, T, H, W) x0 - noise (ignored on conditioning frames)
    t: Tensor  # (B,) time in [0, 1], 1 = pure noise
    noise: Tensor  # (B, C, T, H, W)


def check_frame_cond_mask(frame_cond_mask: Tensor | None, latents: Tensor, name: str = "latents") -> None:
    """Raise MugenError unless ``frame_cond_mask`` is None or a (B, T) bool mask for (B, C, T, H, W)."""
    if frame_cond_mask is None:
        return
    if frame_cond_mask.dtype != torch.bool:
        raise MugenError(
            f"frame_cond_mask has dtype {frame_cond_mask.dtype}, expected torch.bool (True = clean conditioning "
            "frame); convert it with mask.bool()"
        )
    batch, _, frames = latents.shape[:3]
    if tuple(frame_cond_mask.shape) != (batch, frames):
        raise MugenError(
            f"frame_cond_mask has shape {tuple(frame_cond_mask.shape)}, expected (batch, latent frames) = "
            f"{(batch, frames)} to match {name} of shape {tuple(latents.shape)}"
        )


def frame_mask_5d(frame_cond_mask: Tensor, device: torch.device) -> Tensor:
    """(B, T) bool -> (B, 1, T, 1, 1) bool, ready to broadcast against (B, C, T, H, W)."""
    return frame_cond_mask.to(device)[:, None, :, None, None]


def _check_path_inputs(x0: Tensor, t: Tensor, noise: Tensor) -> None:
    if x0.dim() != 5:
        raise MugenError(f"x0 has shape {tuple(x0.shape)}, expected 5 dims (batch, channels, frames, height, width)")
    if noise.shape != x0.shape:
        raise MugenError(f"noise has shape {tuple(noise.shape)}, expected the shape of x0 {tuple(x0.shape)}")
    if tuple(t.shape) != (x0.shape[0],):
        raise MugenError(f"t has shape {tuple(t.shape)}, expected ({x0.shape[0]},): one time per sample")


def sample_flow_path(x0: Tensor, t: Tensor, noise: Tensor, frame_cond_mask: Tensor | None = None) -> FlowPathSample:
    """Build ``x_t = (1 - t) x0 + t noise`` and the target ``x0 - noise``; masked frames of x_t are x0."""
    _check_path_inputs(x0, t, noise)
    check_frame_cond_mask(frame_cond_mask, x0, name="x0")
    t_5d = t.to(device=x0.device, dtype=x0.dtype)[:, None, None, None, None]  # (B, 1, 1, 1, 1)
    x_t = (1 - t_5d) * x0 + t_5d * noise  # (B, C, T, H, W)
    if frame_cond_mask is not None:
        x_t = torch.where(frame_mask_5d(frame_cond_mask, x0.device), x0, x_t)
    return FlowPathSample(x_t=x_t, target_velocity=x0 - noise, t=t, noise=noise)


def flow_matching_loss(
    velocity_fn: VelocityFn,
    x0: Tensor,
    t: Tensor,
    noise: Tensor,
    frame_cond_mask: Tensor | None = None,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Per-sample rectified-flow loss, (B,) float32.

    ``velocity_fn(x_t, t, frame_cond_mask)`` returns the predicted velocity (B, C, T, H, W). The
    loss is the squared error against ``x0 - noise``, averaged over channels and pixels, then over
    the frames that are not conditioning frames; multiplied by ``sample_weight`` (B,) when given
    (e.g. ``IMAGE_SAMPLE_WEIGHT`` for image samples).
    """
    path = sample_flow_path(x0, t, noise, frame_cond_mask)
    predicted = velocity_fn(path.x_t, path.t, frame_cond_mask)
    if predicted.shape != x0.shape:
        raise MugenError(
            f"velocity_fn returned shape {tuple(predicted.shape)}, expected the latent shape {tuple(x0.shape)}"
        )
    squared_error = (predicted.float() - path.target_velocity.float()).square()  # (B, C, T, H, W)
    per_frame = squared_error.mean(dim=(1, 3, 4))  # (B, T)
    if frame_cond_mask is None:
        per_sample = per_frame.mean(dim=1)  # (B,)
    else:
        loss_frames = (~frame_cond_mask).to(per_frame.device, per_frame.dtype)  # (B, T) 1 = in the loss
        frames_per_sample = loss_frames.sum(dim=1)  # (B,)
        if bool((frames_per_sample == 0).any()):
            raise MugenError(
                "frame_cond_mask marks every frame of a sample as conditioning, so it has nothing to learn; "
                "leave at least one frame False per sample"
            )
        per_sample = (per_frame * loss_frames).sum(dim=1) / frames_per_sample  # (B,)
    if sample_weight is not None:
        if tuple(sample_weight.shape) != (x0.shape[0],):
            raise MugenError(
                f"sample_weight has shape {tuple(sample_weight.shape)}, expected ({x0.shape[0]},): "
                "one weight per sample"
            )
        per_sample = per_sample * sample_weight.to(per_sample.device, per_sample.dtype)
    return per_sample


def timestep_bin_losses(per_sample_loss: Tensor, t: Tensor, num_bins: int = 10) -> dict[int, tuple[float, int]]:
    """Group losses by time: ``{bin: (sum of losses, count)}`` for the bins that hold samples.

    Bins are equal-width over [0, 1]: bin k holds ``k / num_bins <= t < (k + 1) / num_bins``, and
    t = 1 falls in the last bin. Sums and counts (not means) so callers can add them across steps
    and ranks before dividing.
    """
    if int(num_bins) != num_bins or num_bins < 1:
        raise MugenError(f"timestep bins: num_bins={num_bins!r} must be a positive whole number")
    if per_sample_loss.dim() != 1 or per_sample_loss.shape != t.shape:
        raise MugenError(
            f"timestep bins: per_sample_loss {tuple(per_sample_loss.shape)} and t {tuple(t.shape)} must both be (B,)"
        )
    if bool(((t < 0) | (t > 1)).any()):
        raise MugenError("timestep bins: t must lie in [0, 1]")
    t = t.detach().to(per_sample_loss.device, torch.float64)
    bins = (t * num_bins).floor().long().clamp(max=num_bins - 1)  # (B,)
    sums = torch.bincount(bins, weights=per_sample_loss.detach().double(), minlength=num_bins)  # (num_bins,)
    counts = torch.bincount(bins, minlength=num_bins)  # (num_bins,)
    return {
        index: (loss_sum, count)
        for index, (loss_sum, count) in enumerate(zip(sums.tolist(), counts.tolist(), strict=True))
        if count > 0
    }
