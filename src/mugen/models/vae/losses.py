"""Video VAE training objective (seed §4.1, eq. 1) and reconstruction metrics.

L_VAE = L_rec + lambda * L_KL (+ gamma * L_GAN in the last stage, added by the trainer), with
L_rec = a * MSE + b * L1 (+ perceptual, added where a perceptual network is available). The
adaptive reconstruction weighting of seed §4.1 is `adaptive_weight_map`; set
`VAELossWeights.adaptive_l1` (and usually `l1=0`) to let it replace the plain L1 term.

Every term is computed per sample first, so the trainer can log and reduce as it likes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mugen.errors import MugenError
from mugen.models.vae.distributions import DiagonalGaussian

# Data range of videos in [-1, 1]: PSNR's peak signal is (max - min) = 2.
VIDEO_DATA_RANGE = 2.0


@dataclass
class VAELossWeights:
    mse: float = 1.0
    l1: float = 1.0
    kl: float = 1e-6  # lambda of seed eq. (1); KL is a mean per latent element
    adaptive_l1: float = 0.0  # seed §4.1 adaptive reconstruction loss; 0 disables it


def _per_sample_mean(values: Tensor) -> Tensor:
    return values.flatten(1).mean(dim=1)  # (B,)


def _check_pair(recon: Tensor, target: Tensor) -> None:
    if recon.shape != target.shape:
        raise MugenError(
            f"reconstruction {tuple(recon.shape)} and target {tuple(target.shape)} differ in shape; "
            "decode the latents of this exact batch"
        )


# seed §4.1: w_t = |Δ_t (∇² x_t)|
def adaptive_weight_map(video: Tensor) -> Tensor:
    """Spatiotemporal saliency of a video (B, C, T, H, W) -> weights of the same shape (B, C, T, H, W).

    Per frame and channel, the 5-point Laplacian  ∇²x = x[h-1] + x[h+1] + x[w-1] + x[w+1] - 4x
    (replicate padding, so flat borders score 0); then the temporal forward difference
    Δ_t L = L[t+1] - L[t] and its absolute value. Forward differences give T-1 maps; frame T-1 has
    no successor and reuses the map of frame T-2, so every frame carries a weight (T == 1 gives
    zeros: a still has no motion). The map is detached: it weights the loss, it is not a target.
    """
    if video.ndim != 5:
        raise MugenError(
            f"adaptive_weight_map got shape {tuple(video.shape)}; expected a video (B, C, T, H, W)"
        )
    video = video.detach()
    batch, channels, frames, height, width = video.shape
    kernel = video.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    kernel = kernel.view(1, 1, 3, 3).expand(channels, 1, 3, 3)
    flat = video.transpose(1, 2).reshape(batch * frames, channels, height, width)
    flat = F.pad(flat, (1, 1, 1, 1), mode="replicate")  # (B*T, C, H+2, W+2)
    laplacian = F.conv2d(flat, kernel, groups=channels)  # (B*T, C, H, W)
    laplacian = laplacian.reshape(batch, frames, channels, height, width).transpose(1, 2)
    if frames == 1:
        return torch.zeros_like(video)
    difference = (laplacian[:, :, 1:] - laplacian[:, :, :-1]).abs()  # (B, C, T-1, H, W)
    return torch.cat([difference, difference[:, :, -1:]], dim=2)  # (B, C, T, H, W)


def adaptive_l1(recon: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """seed §4.1 L_adaptive: L1 weighted by the target's saliency map, per sample (B,).

    The map is divided by its per-sample mean so that the term has the scale of plain L1 and
    only redistributes the gradient towards edges that move.
    """
    weights = adaptive_weight_map(target)  # (B, C, T, H, W)
    weights = weights / (_per_sample_mean(weights).view(-1, *[1] * (weights.ndim - 1)) + eps)
    return _per_sample_mean(weights * (recon - target).abs())


# seed §4.1 eq. (1), without the perceptual and GAN terms
def vae_loss(
    recon: Tensor, target: Tensor, posterior: DiagonalGaussian, weights: VAELossWeights
) -> dict[str, Tensor]:
    """Reconstruction + KL loss for a batch of videos (B, 3, T, H, W).

    Returns scalars "loss" (to backprop), "mse", "l1", "kl" (batch means) and "adaptive_l1"
    when its weight is non-zero, plus "per_sample" (B,): the weighted loss of each sample.
    """
    _check_pair(recon, target)
    error = recon - target
    mse = _per_sample_mean(error.pow(2))  # (B,)
    l1 = _per_sample_mean(error.abs())  # (B,)
    kl = posterior.kl()  # (B,)
    per_sample = weights.mse * mse + weights.l1 * l1 + weights.kl * kl
    terms = {"mse": mse.mean(), "l1": l1.mean(), "kl": kl.mean()}
    if weights.adaptive_l1:
        adaptive = adaptive_l1(recon, target)  # (B,)
        per_sample = per_sample + weights.adaptive_l1 * adaptive
        terms["adaptive_l1"] = adaptive.mean()
    return {"loss": per_sample.mean(), **terms, "per_sample": per_sample}


def psnr(recon: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per sample (B,), for videos in [-1, 1] (data range 2).

    Identical inputs give +inf.
    """
    _check_pair(recon, target)
    mse = _per_sample_mean((recon.float() - target.float()).pow(2))  # (B,)
    return 10.0 * torch.log10(VIDEO_DATA_RANGE**2 / mse)


__all__ = [
    "VIDEO_DATA_RANGE",
    "VAELossWeights",
    "adaptive_l1",
    "adaptive_weight_map",
    "psnr",
    "vae_loss",
]
