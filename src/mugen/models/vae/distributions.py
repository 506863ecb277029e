"""Diagonal Gaussian posterior q(z | x) of the Video VAE (seed §3.1, §4.1 KL term)."""

from __future__ import annotations

import torch
from torch import Tensor

from mugen.errors import MugenError

# Clamp keeps exp(logvar) finite in float32/bf16 even for a badly initialised encoder.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latents shaped (B, C, t, h, w)."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        if mean.shape != logvar.shape:
            raise MugenError(
                f"DiagonalGaussian got mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)}; "
                "both must have the same shape"
            )
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_parameters(cls, parameters: Tensor) -> "DiagonalGaussian":
        """Split an encoder output (B, 2C, ...) into mean (first C) and log-variance (last C)."""
        mean, logvar = parameters.chunk(2, dim=1)  # (B, C, t, h, w) each
        return cls(mean, logvar)

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw mean + std * eps (differentiable in mean and logvar)."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) averaged over latent elements, one value per sample: Tensor[B].

        Per element: 0.5 * (mean^2 + var - 1 - logvar). Dividing by the element count (rather
        than summing) keeps the weight lambda of seed eq. (1) independent of clip size.
        """
        per_element = 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)
        return per_element.flatten(1).mean(dim=1)  # (B,)
