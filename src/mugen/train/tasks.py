"""Training objectives that plug a model into the generic Trainer (``TrainTask`` protocol).

The objectives live here and in ``mugen.flow``; the networks know nothing about them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mugen.flow.objective import flow_matching_loss
from mugen.flow.timesteps import resolution_shift_ratio, sample_training_timesteps
from mugen.models.text.base import TextFeatures, pad_text_features
from mugen.train.trainer import LossOutput


@dataclass
class DiTTaskConfig:
    image_loss_weight: float = 0.3  # the official code weighs image samples by 0.3 (DESIGN.md)
    text_dropout: float = 0.1  # replace the caption by the null text, for classifier-free guidance
    first_frame_cond_prob: float = 0.0  # seed §4.2.2: first-frame masking, on from curriculum stage 2
    timestep_mean: float = 0.0  # logit-normal location
    timestep_std: float = 1.0  # logit-normal scale
    spatial_factor: int = 8  # VAE pixels per latent, for the resolution shift
    # The shift ratio is sqrt(H*W / base) * sqrt(T_latent); the release uses base = 512^2. Small
    # demo resolutions lower the base so training and sampling still cover the high-noise range.
    shift_base_resolution: int = 512 * 512


def model_velocity_fn(model: nn.Module, text: TextFeatures, fps: Tensor | None):
    """Adapt MUG-DiT to the flow code's ``velocity_fn(x_t, t, frame_cond_mask)``.

    The flow code speaks t in [0, 1]; the network sees 1000 t and returns 2C channels, of which the
    first C are the velocity.
    """

    def velocity(x_t: Tensor, t: Tensor, frame_cond_mask: Tensor | None) -> Tensor:
        # Under CFG the sampler doubles the batch; ``text`` then holds [cond; uncond] already.
        if x_t.shape[0] != text.states.shape[0]:
            raise ValueError(f"batch {x_t.shape[0]} does not match text features {text.states.shape[0]}")
        rate = fps
        if rate is not None and rate.shape[0] != x_t.shape[0]:
            rate = rate.repeat(x_t.shape[0] // rate.shape[0])
        out = model(x_t, t * 1000.0, text.states, text.mask, rate, frame_cond_mask)
        return out[:, : x_t.shape[1]]

    return velocity


class DiTFlowTask:
    """Rectified-flow training of MUG-DiT on latents + text features (seed §4.2, DESIGN.md)."""

    def __init__(self, config: DiTTaskConfig, null_text: TextFeatures):
        self.config = config
        self.null_text = null_text  # (1, L0, D): the features of the empty prompt

    def compute_loss(self, model: nn.Module, batch: dict, generator: torch.Generator, rows: slice | None = None) -> LossOutput:
        """``rows``: compute the loss of these samples only, with the noise, flow times and dropout
        drawn for the whole batch (a data-parallel rank's share of a global batch, ``distributed_run.py``)."""
        default_fps = model.config.default_fps if batch.get("fps") is not None else None
        inputs = self.draw_inputs(batch, generator, default_fps, rows)
        per_sample = flow_matching_loss(
            model_velocity_fn(model, inputs.text, inputs.fps), inputs.x0, inputs.t, inputs.noise, inputs.frame_cond_mask,
            sample_weight=inputs.weights,
        )
        return LossOutput(
            loss=per_sample.mean(),
            per_sample=per_sample.detach(),
            timesteps=inputs.t.detach(),
            metrics={"text_dropped": inputs.text_dropped},
        )

    def draw_inputs(self, batch: dict, generator: torch.Generator, default_fps: float | None, rows: slice | None = None) -> "FlowInputs":
        """Everything random of a step (flow times, noise, first-frame masks, text dropout), drawn for
        the whole batch in a fixed order, then cut to ``rows``; the pipeline-parallel run
        (``pipeline_run.py``) feeds the same inputs to its stages. ``default_fps`` replaces a
        frame rate of 0 (unknown)."""
        cfg = self.config
        x0 = batch["latents"]  # (B, C, T, h, w), one shape per batch (shape buckets)
        batch_size, _, latent_frames, height, width = x0.shape
        device = x0.device
        ratio = resolution_shift_ratio(
            height * cfg.spatial_factor, width * cfg.spatial_factor, latent_frames, cfg.shift_base_resolution
        )
        t = sample_training_timesteps(batch_size, ratio, generator, device, cfg.timestep_mean, cfg.timestep_std)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)

        frame_cond_mask = None
        if cfg.first_frame_cond_prob > 0 and latent_frames > 1:
            first = torch.rand(batch_size, generator=generator, device=device) < cfg.first_frame_cond_prob
            frame_cond_mask = torch.zeros(batch_size, latent_frames, dtype=torch.bool, device=device)
            frame_cond_mask[:, 0] = first

        text = TextFeatures(batch["text_states"], batch["text_mask"])
        drop = torch.rand(batch_size, generator=generator, device=device) < cfg.text_dropout
        if bool(drop.any()):
            text = replace_with_null_text(text, self.null_text.to(device), drop)

        kinds = batch.get("kinds") or ["video"] * batch_size
        weights = torch.tensor([cfg.image_loss_weight if k == "image" else 1.0 for k in kinds], device=device)
        fps = batch.get("fps")
        if fps is not None:  # manifests without a frame rate (e.g. the official CSV) carry 0
            fps = torch.where(fps > 0, fps, torch.full_like(fps, default_fps))
        if rows is not None:  # everything above was drawn for the whole batch: the same on every rank
            x0, t, noise, weights = x0[rows], t[rows], noise[rows], weights[rows]
            frame_cond_mask = None if frame_cond_mask is None else frame_cond_mask[rows]
            text = TextFeatures(text.states[rows], text.mask[rows])
            fps = None if fps is None else fps[rows]
        return FlowInputs(x0, t, noise, frame_cond_mask, text, fps, weights, float(drop.float().mean()))


@dataclass
class FlowInputs:
    """One step's inputs of the flow loss (``DiTFlowTask.draw_inputs``)."""

    x0: Tensor  # (B, C, T, h, w) clean latents
    t: Tensor  # (B,) flow times in [0, 1]
    noise: Tensor  # (B, C, T, h, w)
    frame_cond_mask: Tensor | None  # (B, T) bool, True = clean conditioning frame
    text: TextFeatures  # (B, L, D) states and (B, L) mask, dropped captions replaced by the null text
    fps: Tensor | None  # (B,)
    weights: Tensor  # (B,) per-sample loss weights (images: image_loss_weight)
    text_dropped: float  # fraction of the whole batch's captions dropped


def replace_with_null_text(text: TextFeatures, null_text: TextFeatures, drop: Tensor) -> TextFeatures:
    """Swap the rows selected by ``drop`` (B,) for the null text, padding both to one length."""
    length = max(text.states.shape[1], null_text.states.shape[1])
    text = pad_text_features([text], length) if text.states.shape[1] < length else text
    null = pad_text_features([null_text], length) if null_text.states.shape[1] < length else null_text
    states = torch.where(drop[:, None, None], null.states.to(text.states.dtype).expand_as(text.states), text.states)
    mask = torch.where(drop[:, None], null.mask.expand_as(text.mask), text.mask)
    return TextFeatures(states, mask)


@dataclass
class VAETaskConfig:
    mse_weight: float = 1.0
    l1_weight: float = 1.0
    kl_weight: float = 1e-6
    decoder_windows: tuple[int, ...] = (1, 4, 8)  # seed §3.1.2: decoder sees 1, 4 or 8 latents
    train_crop: int = 0  # > 0: train on random square crops of this size (the VAE is convolutional)


class VAETask:
    """Video VAE reconstruction training: MSE + L1 + KL (seed §4.1 eq. 1; perceptual and GAN later)."""

    def __init__(self, config: VAETaskConfig):
        from mugen.models.vae.losses import VAELossWeights

        self.config = config
        self.weights = VAELossWeights(mse=config.mse_weight, l1=config.l1_weight, kl=config.kl_weight)

    def compute_loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> LossOutput:
        from mugen.models.vae.losses import psnr, vae_loss

        video = batch["video"]  # (B, 3, 8n, H, W)
        crop = self.config.train_crop
        if crop and (video.shape[-2] > crop or video.shape[-1] > crop):
            top = int(torch.randint(video.shape[-2] - crop + 1, (1,), generator=generator, device=generator.device))
            left = int(torch.randint(video.shape[-1] - crop + 1, (1,), generator=generator, device=generator.device))
            video = video[..., top : top + crop, left : left + crop]  # (B, 3, 8n, crop, crop)
        latent_frames = video.shape[2] // 8
        windows = [w for w in self.config.decoder_windows if w <= latent_frames] or [1]
        pick = int(torch.randint(len(windows), (1,), generator=generator, device=generator.device).item())
        recon, posterior = model(video, window=windows[pick], generator=generator)
        losses = vae_loss(recon, video, posterior, self.weights)
        with torch.no_grad():
            quality = psnr(recon.clamp(-1, 1).float(), video.float()).mean().item()
        return LossOutput(
            loss=losses["loss"],
            per_sample=losses["per_sample"].detach(),
            metrics={
                "mse": float(losses["mse"].detach()),
                "l1": float(losses["l1"].detach()),
                "kl": float(losses["kl"].detach()),
                "psnr": quality,
                "window": float(windows[pick]),
            },
        )
