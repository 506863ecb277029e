"""Configuration and named presets for the trainable Video VAE (seed §3.1).

The design is fixed by the report: 8x8x8 (T, H, W) compression into 24 latent channels. Widths
and depth are the knobs; presets are plain functions so a new size is one more function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mugen.errors import MugenError


@dataclass
class VideoVAEConfig:
    """Constructor arguments of `VideoVAE`; serialised as `config.json` next to the weights."""

    in_channels: int = 3
    latent_channels: int = 24  # seed §3.1.1: C = 24
    base_channels: int = 128
    # One entry per resolution level; len = number of down stages + 1 (3 down stages -> 8x).
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_chunk: int = 8  # frames per latent (seed §3.1.2, fixed by the design)
    spatial_factor: int = 8
    norm_groups: int = 32  # GroupNorm groups; must divide every stage width
    mid_attention: bool = True  # per-frame spatial self-attention at the latent resolution
    decoder_windows: tuple[int, ...] = field(default=(1, 4, 8))  # seed §3.1.2 sharing decoder

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep the declared types.
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        self.decoder_windows = tuple(int(w) for w in self.decoder_windows)

    @property
    def num_down_stages(self) -> int:
        return len(self.channel_multipliers) - 1

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    def validate(self) -> None:
        """Raise `MugenError` when the sizes cannot build the 2x-per-stage design."""
        if self.num_down_stages < 1:
            raise MugenError(
                f"VideoVAEConfig.channel_multipliers={self.channel_multipliers} has fewer than 2 "
                "entries; give one multiplier per level, e.g. (1, 2, 4, 4) for 8x compression"
            )
        factor = 2**self.num_down_stages
        if self.temporal_chunk != factor or self.spatial_factor != factor:
            raise MugenError(
                f"VideoVAEConfig has temporal_chunk={self.temporal_chunk}, spatial_factor="
                f"{self.spatial_factor} but {self.num_down_stages} down stages compress by "
                f"{factor}; every stage halves T, H and W, so set both to {factor} or change "
                "channel_multipliers"
            )
        for width in self.stage_channels:
            if width % self.norm_groups != 0:
                raise MugenError(
                    f"VideoVAEConfig stage width {width} is not divisible by norm_groups="
                    f"{self.norm_groups}; pick base_channels/channel_multipliers/norm_groups so "
                    "that it is"
                )
        if self.num_res_blocks < 1 or self.latent_channels < 1 or self.in_channels < 1:
            raise MugenError(
                "VideoVAEConfig num_res_blocks, latent_channels and in_channels must be >= 1, got "
                f"{self.num_res_blocks}, {self.latent_channels}, {self.in_channels}"
            )
        bad_windows = [w for w in self.decoder_windows if w < 1]
        if not self.decoder_windows or bad_windows:
            raise MugenError(
                f"VideoVAEConfig.decoder_windows={self.decoder_windows} must be positive latent "
                "counts, e.g. (1, 4, 8)"
            )


def tiny_vae() -> VideoVAEConfig:
    """Demo/test size: fast enough for a CPU forward+backward in well under a second."""
    return VideoVAEConfig(
        base_channels=16,
        channel_multipliers=(1, 2, 4, 4),
        num_res_blocks=1,
        norm_groups=8,
        mid_attention=True,
    )


def paper_vae() -> VideoVAEConfig:
    """Paper scale: SDXL-VAE-like widths 128/256/512/512 (seed §3.1.1 starts from SDXL's VAE)."""
    return VideoVAEConfig(
        base_channels=128,
        channel_multipliers=(1, 2, 4, 4),
        num_res_blocks=2,
        norm_groups=32,
        mid_attention=True,
    )


VAE_PRESETS: dict[str, Callable[[], VideoVAEConfig]] = {
    "tiny": tiny_vae,
    "paper": paper_vae,
}


def vae_config(name: str) -> VideoVAEConfig:
    """Return a fresh config for the named preset."""
    if name not in VAE_PRESETS:
        raise MugenError(
            f"unknown Video VAE preset {name!r}; choose one of: {', '.join(sorted(VAE_PRESETS))}"
        )
    return VAE_PRESETS[name]()
