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
from collections.abc import Iterator, Sequence

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


def validation_batches(
    samples: Sequence[dict],
    *,
    num_levels: int,
    seed: int,
    spatial_factor: int,
    shift_base_resolution: int,
    batch_size: int,
    default_fps: float,
    device: str | torch.device,
    pad_to: int = 1,
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """The held-out rows of :func:`flow_validation_loss`, ``batch_size`` at a time.

    Every (sample, level) pair is one row. Yields ``(rows, batch)``: ``rows`` real rows, and the batch's
    ``latents`` (B, C, T, h, w) float32, ``t`` (B,), ``noise`` (B, C, T, h, w), ``text_states`` (B, L, D) float32,
    ``text_mask`` (B, L) bool and ``fps`` (B,). ``pad_to``: each batch is padded to a multiple of it by repeating
    its first row (pipeline micro-batches); the padding rows come last.
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
    _, frames, height, width = shapes.pop()
    ratio = resolution_shift_ratio(height * spatial_factor, width * spatial_factor, frames, shift_base_resolution)
    levels = validation_timesteps(num_levels, ratio)  # (K,)
    rows = [(index, level) for index in range(len(samples)) for level in range(num_levels)]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        chunk = chunk + [chunk[0]] * (-(-len(chunk) // pad_to) * pad_to - len(chunk))
        latents = torch.stack([samples[i]["latents"] for i, _ in chunk]).to(device).float()  # (B, C, T, h, w)
        yield min(batch_size, len(rows) - start), {
            "latents": latents,
            "t": levels[[k for _, k in chunk]].to(device),  # (B,)
            "noise": torch.stack([_noise(seed, i, k, latents.shape[1:]) for i, k in chunk]).to(device),
            "text_states": torch.stack([samples[i]["text_states"] for i, _ in chunk]).to(device).float(),  # (B, L, D)
            "text_mask": torch.stack([samples[i]["text_mask"] for i, _ in chunk]).to(device).bool(),  # (B, L)
            "fps": torch.tensor([float(samples[i].get("fps", 0.0) or default_fps) for i, _ in chunk], device=device),
        }


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
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batches = validation_batches(
        samples, num_levels=num_levels, seed=seed, spatial_factor=spatial_factor, shift_base_resolution=shift_base_resolution,
        batch_size=batch_size, default_fps=model.config.default_fps, device=device,
    )
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for rows, batch in batches:
            text = TextFeatures(batch["text_states"], batch["text_mask"])
            velocity = model_velocity_fn(model, text, batch["fps"])
            per_sample = flow_matching_loss(velocity, batch["latents"], batch["t"], batch["noise"])  # (B,)
            total += float(per_sample.double().sum())
            count += rows
    finally:
        model.train(was_training)
    return total / count
