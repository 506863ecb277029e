"""Deterministic validation loss for rectified-flow models.

The training loss is noisy (one random t and one noise draw per sample per step), so comparing two
runs, or noticing a plateau, needs a fixed yardstick. ``flow_validation_loss`` evaluates every
held-out sample at the same K noise levels with the same noise every time it is called:

    t_k = shift(sigmoid(Phi^-1((k + 1/2) / K)), r)    k = 0 .. K-1

i.e. the K quantile midpoints of the training distribution (logit-normal, then the resolution
shift ``r`` of seed §4.2 / DESIGN.md), so the validation loss weighs noise levels as training does.
The noise of sample ``i`` at level ``k`` comes from a CPU generator seeded with ``(seed, i, k)``, so
the value does not depend on batch size, device or call order. Used by the curriculum's plateau
transitions and by the training-strategy demonstrations (parameter expansion vs. from scratch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mugen.errors import MugenError
from mugen.flow.objective import flow_matching_loss
from mugen.flow.timesteps import resolution_shift_ratio, shift_timesteps
from mugen.models.text.base import TextFeatures
from mugen.train.tasks import model_velocity_fn


def validation_timesteps(num_levels: int, ratio: float, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """(K,) float32: quantile midpoints of the shifted logit-normal training distribution."""
    if int(num_levels) != num_levels or num_levels < 1:
        raise MugenError(f"validation: num_levels={num_levels!r} must be a positive whole number")
    probabilities = (torch.arange(num_levels, dtype=torch.float64) + 0.5) / num_levels  # (K,)
    normal_quantiles = math.sqrt(2.0) * torch.erfinv(2 * probabilities - 1)  # Phi^-1(p)
    t = torch.sigmoid(mean + std * normal_quantiles)
    return shift_timesteps(t, ratio).float()


def _noise(seed: int, sample: int, level: int, shape: Sequence[int]) -> Tensor:
    generator = torch.Generator().manual_seed(hash((int(seed), int(sample), int(level))) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(tuple(shape), generator=generator)


@torch.no_grad()
def flow_validation_loss(
    model: nn.Module,
    samples: Sequence[dict],
    *,
    num_levels: int = 8,
    seed: int = 0,
    spatial_factor: int = 8,
    shift_base_resolution: int = 512 * 512,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> float:
    """Mean flow-matching MSE of ``model`` over ``samples`` x ``num_levels`` fixed noise levels.

    ``samples``: items as ``LatentTextDataset`` yields them: ``latents`` (C, T, h, w), ``text_states``
    (L, D), ``text_mask`` (L,), optional ``fps``. All samples must share one latent shape and one
    text length (one shape bucket; pad text beforehand). The model is put in eval mode for the call
    and restored afterwards.
    """
    if not samples:
        raise MugenError("validation: no held-out samples; give at least one")
    shapes = {tuple(item["latents"].shape) for item in samples}
    text_shapes = {tuple(item["text_states"].shape) for item in samples}
    if len(shapes) > 1 or len(text_shapes) > 1:
        raise MugenError(
            f"validation: samples mix latent shapes {sorted(shapes)} or text shapes {sorted(text_shapes)}; "
            "validate one shape bucket at a time (pad captions to one length)"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    channels, frames, height, width = shapes.pop()
    ratio = resolution_shift_ratio(height * spatial_factor, width * spatial_factor, frames, shift_base_resolution)
    levels = validation_timesteps(num_levels, ratio)  # (K,)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        # Every (sample, level) pair is one row; rows are evaluated batch_size at a time.
        rows = [(index, level) for index in range(len(samples)) for level in range(num_levels)]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            latents = torch.stack([samples[i]["latents"] for i, _ in chunk]).to(device)  # (B, C, T, h, w)
            text = TextFeatures(
                torch.stack([samples[i]["text_states"] for i, _ in chunk]).to(device).float(),  # (B, L, D)
                torch.stack([samples[i]["text_mask"] for i, _ in chunk]).to(device).bool(),  # (B, L)
            )
            fps_values = [float(samples[i].get("fps", 0.0) or model.config.default_fps) for i, _ in chunk]
            fps = torch.tensor(fps_values, device=device)  # (B,)
            t = levels[[k for _, k in chunk]].to(device)  # (B,)
            noise = torch.stack([_noise(seed, i, k, latents.shape[1:]) for i, k in chunk]).to(device)
            per_sample = flow_matching_loss(model_velocity_fn(model, text, fps), latents.float(), t, noise)  # (B,)
            total += float(per_sample.double().sum())
            count += len(chunk)
    finally:
        model.train(was_training)
    return total / count
