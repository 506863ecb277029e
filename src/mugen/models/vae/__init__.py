"""Trainable Video VAE of the MUG-V report (seed §3.1, §4.1, App. A.1): 8x8x8 compression, 24 channels."""

from mugen.models.vae.distributions import DiagonalGaussian
from mugen.models.vae.losses import VAELossWeights, adaptive_weight_map, psnr, vae_loss
from mugen.models.vae.model import VideoVAE, estimate_latent_statistics
from mugen.models.vae.presets import VAE_PRESETS, VideoVAEConfig, vae_config

__all__ = [
    "VAE_PRESETS",
    "DiagonalGaussian",
    "VAELossWeights",
    "VideoVAE",
    "VideoVAEConfig",
    "adaptive_weight_map",
    "estimate_latent_statistics",
    "psnr",
    "vae_config",
    "vae_loss",
]
