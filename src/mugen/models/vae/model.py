"""The trainable Video VAE of the report: 8x8x8 (T, H, W) compression into 24 channels.

seed §3.1.1: every down stage pairs a 2D spatial convolution (per frame, texture) with a 3D
convolution (motion); three stages halve T, H and W each. seed §3.1.2 (Alg. 1): minimal encoding,
every 8-frame chunk is encoded on its own by reshaping chunks into the batch, so no information
crosses chunks; the decoder sees a window of w in {1, 4, 8} contiguous latents, again reshaped into
the batch. Because chunks and windows live in the batch dimension, every padding and every
normalisation below stays inside its own chunk (encoder) or window (decoder) by construction.

Widths come from `VideoVAEConfig`; the "paper" preset uses SDXL-VAE-like widths (128/256/512/512),
since the report initialises from that image VAE: the 2D convolutions here are real `nn.Conv2d`
layers, so image-VAE weights map onto them directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from mugen.atomic import write_atomically
from mugen.errors import MugenError
from mugen.models.vae.distributions import DiagonalGaussian
from mugen.models.vae.presets import VideoVAEConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "DiagonalGaussian",
    "VideoVAE",
    "estimate_latent_statistics",
]


# ---------------------------------------------------------------------------------------------
# Building blocks. Every module takes and returns (N, C, T, H, W) with N = batch * chunks/windows.
# ---------------------------------------------------------------------------------------------


class SpatialConv(nn.Module):
    """A 2D convolution applied to every frame independently (intra-frame texture)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2
        )

    def forward(self, x: Tensor) -> Tensor:
        batch, _, frames, _, _ = x.shape
        x = x.transpose(1, 2).flatten(0, 1)  # (N*T, C, H, W)
        x = self.conv(x)  # (N*T, C', H', W')
        return x.unflatten(0, (batch, frames)).transpose(1, 2)  # (N, C', T, H', W')


class TemporalConv3d(nn.Module):
    """A 3x3x3 convolution (inter-frame motion) with replicate padding in time, zeros in space.

    Replicating the edge frames (instead of zero padding) makes the first and last frames of a
    chunk see a plausible neighbour; the padding never reaches another chunk because chunks are
    separate batch elements.
    """

    def __init__(self, in_channels: int, out_channels: int, temporal_stride: int = 1):
        super().__init__()
        self.time_pad = 1
        self.conv = nn.Conv3d(
            in_channels, out_channels, 3, stride=(temporal_stride, 1, 1), padding=(0, 1, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        first = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
        last = x[:, :, -1:].expand(-1, -1, self.time_pad, -1, -1)
        x = torch.cat([first, x, last], dim=2)  # (N, C, T + 2, H, W)
        return self.conv(x)  # (N, C', T / stride, H, W)


class HybridResBlock(nn.Module):
    """GroupNorm + SiLU residual block: 2D spatial conv, then 3D conv (seed §3.1.1 hybrid stack)."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=1e-6)
        self.spatial = SpatialConv(in_channels, out_channels)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=1e-6)
        self.temporal = TemporalConv3d(out_channels, out_channels)
        # A per-frame 1x1 conv matches widths; (much faster on CPU than a 1x1x1 Conv3d backward).
        self.skip = (
            SpatialConv(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.spatial(F.silu(self.norm1(x)))  # (N, C_out, T, H, W)
        h = self.temporal(F.silu(self.norm2(h)))  # (N, C_out, T, H, W)
        return self.skip(x) + h


class FrameAttention(nn.Module):
    """Single-head self-attention over the h*w positions of each frame (bottleneck only)."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, frames, height, width = x.shape
        h = self.norm(x).permute(0, 2, 3, 4, 1).reshape(batch * frames, height * width, channels)
        query, key, value = self.qkv(h).chunk(3, dim=-1)  # (N*T, h*w, C) each
        h = F.scaled_dot_product_attention(query, key, value)  # (N*T, h*w, C)
        h = self.out(h).reshape(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3)
        return x + h  # (N, C, T, H, W)


class Downsample(nn.Module):
    """Halve H, W (strided 2D conv per frame) then T (strided 3D conv): one down stage's resampler."""

    def __init__(self, channels: int):
        super().__init__()
        self.spatial = SpatialConv(channels, channels, stride=2)
        self.temporal = TemporalConv3d(channels, channels, temporal_stride=2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.spatial(x)  # (N, C, T, H/2, W/2)
        return self.temporal(x)  # (N, C, T/2, H/2, W/2)


class Upsample(nn.Module):
    """Double T (3D conv to 2C channels, then a time shuffle), then H, W (nearest + 2D conv).

    The 2D conv also narrows to the next level's width, so the wide tensor never reaches the
    higher resolution (the costliest place for a conv).
    """

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.temporal = TemporalConv3d(channels, 2 * channels)
        self.spatial = SpatialConv(channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, frames, height, width = x.shape
        x = self.temporal(x)  # (N, 2C, T, H, W); channel k*C + c feeds output frame 2t + k
        x = x.view(batch, 2, channels, frames, height, width).permute(0, 2, 3, 1, 4, 5)
        x = x.reshape(batch, channels, 2 * frames, height, width)  # (N, C, 2T, H, W)
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")  # (N, C, 2T, 2H, 2W)
        return self.spatial(x)  # (N, C_out, 2T, 2H, 2W)


class MidBlock(nn.Module):
    def __init__(self, channels: int, norm_groups: int, attention: bool):
        super().__init__()
        self.res1 = HybridResBlock(channels, channels, norm_groups)
        self.attention = FrameAttention(channels, norm_groups) if attention else nn.Identity()
        self.res2 = HybridResBlock(channels, channels, norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attention(self.res1(x)))


class Encoder(nn.Module):
    """One 8-frame chunk (N, 3, 8, H, W) -> posterior parameters (N, 2C, 1, H/8, W/8)."""

    def __init__(self, config: VideoVAEConfig):
        super().__init__()
        widths = config.stage_channels
        groups = config.norm_groups
        self.conv_in = SpatialConv(config.in_channels, widths[0])
        self.stages = nn.ModuleList()
        in_width = widths[0]
        for level, width in enumerate(widths):
            stage = nn.Module()
            blocks = [HybridResBlock(in_width, width, groups)]
            blocks += [HybridResBlock(width, width, groups) for _ in range(config.num_res_blocks - 1)]
            stage.blocks = nn.ModuleList(blocks)
            is_last = level == len(widths) - 1
            stage.downsample = nn.Identity() if is_last else Downsample(width)
            self.stages.append(stage)
            in_width = width
        self.mid = MidBlock(in_width, groups, config.mid_attention)
        self.norm_out = nn.GroupNorm(groups, in_width, eps=1e-6)
        self.conv_out = TemporalConv3d(in_width, 2 * config.latent_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)  # (N, c0, 8, H, W)
        for stage in self.stages:
            for block in stage.blocks:
                x = block(x)
            x = stage.downsample(x)  # halves T, H, W except after the last level
        x = self.mid(x)  # (N, c_last, 1, H/8, W/8)
        return self.conv_out(F.silu(self.norm_out(x)))  # (N, 2C, 1, H/8, W/8)


class Decoder(nn.Module):
    """A window of w latents (N, C, w, h, w_) -> frames (N, 3, 8w, 8h, 8w_)."""

    def __init__(self, config: VideoVAEConfig):
        super().__init__()
        widths = config.stage_channels
        groups = config.norm_groups
        self.conv_in = TemporalConv3d(config.latent_channels, widths[-1])
        self.mid = MidBlock(widths[-1], groups, config.mid_attention)
        self.stages = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            stage = nn.Module()
            stage.blocks = nn.ModuleList(
                HybridResBlock(width, width, groups) for _ in range(config.num_res_blocks)
            )
            stage.upsample = nn.Identity() if level == 0 else Upsample(width, widths[level - 1])
            self.stages.append(stage)
        self.norm_out = nn.GroupNorm(groups, widths[0], eps=1e-6)
        # Per-frame projection to RGB: motion is already resolved by the 3D convs above.
        self.conv_out = SpatialConv(widths[0], config.in_channels)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)  # (N, c_last, w, h, w_)
        x = self.mid(x)
        for stage in self.stages:
            for block in stage.blocks:
                x = block(x)
            x = stage.upsample(x)  # doubles T, H, W (narrows C) except after the last level
        return self.conv_out(F.silu(self.norm_out(x)))  # (N, 3, 8w, 8h, 8w_)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class VideoVAE(nn.Module):
    """Video VAE with minimal encoding and a windowed shared decoder (seed §3.1, App. A.1)."""

    def __init__(self, config: VideoVAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # Per-channel latent statistics; they travel with the checkpoint (DESIGN.md conventions).
        self.register_buffer("latent_shift", torch.zeros(config.latent_channels))
        self.register_buffer("latent_scale", torch.ones(config.latent_channels))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Start as a stable, near-identity residual stack.

        - Every conv/linear: variance-preserving normal init (std 1/sqrt(fan_in)), zero bias, so
          the signal neither explodes nor vanishes through the ~10 plain convs of each path.
        - The last conv of each residual branch and the attention output: zero, so every block
          starts as the identity (the net begins as a shallow conv chain and grows depth).
        - Time-shuffle convs of the upsamplers: both output halves share weights, so each starts
          as a nearest-neighbour upsample in time (no frame flicker at step 0).
        - Decoder RGB projection: zero, so the first reconstruction is 0 (mid-grey) and the first
          loss equals the data's second moment instead of that plus random-output noise.
        - Encoder log-variance head: zero weights, bias -6 (posterior std ~0.05), so early
          samples carry the encoder's signal instead of unit noise; the KL term then sets the
          variance it wants.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, HybridResBlock):
                nn.init.zeros_(module.temporal.conv.weight)
            elif isinstance(module, FrameAttention):
                nn.init.zeros_(module.out.weight)
            elif isinstance(module, Upsample):
                weight = module.temporal.conv.weight  # (2C, C, 3, 3, 3)
                half = weight.shape[0] // 2
                with torch.no_grad():
                    weight[half:].copy_(weight[:half])
        nn.init.zeros_(self.decoder.conv_out.conv.weight)
        logvar_head = slice(self.config.latent_channels, None)
        with torch.no_grad():
            self.encoder.conv_out.conv.weight[logvar_head].zero_()
            self.encoder.conv_out.conv.bias[logvar_head].fill_(-6.0)

    # ---- validation helpers ---------------------------------------------------------------

    def _check_video(self, video: Tensor, name: str = "video") -> None:
        chunk, factor = self.config.temporal_chunk, self.config.spatial_factor
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise MugenError(
                f"{name} has shape {tuple(video.shape)}; expected (B, {self.config.in_channels}, "
                "T, H, W) with values in [-1, 1]"
            )
        _, _, frames, height, width = video.shape
        if frames == 0 or frames % chunk or height % factor or width % factor or not height * width:
            raise MugenError(
                f"{name} has shape {tuple(video.shape)}; T must be a positive multiple of {chunk} "
                f"and H, W positive multiples of {factor} (each latent is one {chunk}-frame chunk); "
                "crop or pad the clip to fit"
            )

    def _check_latents(self, latents: Tensor, window: int) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels:
            raise MugenError(
                f"latents have shape {tuple(latents.shape)}; expected "
                f"(B, {self.config.latent_channels}, t, h, w)"
            )
        if latents.shape[2] == 0:
            raise MugenError(f"latents have shape {tuple(latents.shape)}; t must be at least 1")
        if window not in self.config.decoder_windows:
            raise MugenError(
                f"decoder window={window} is not supported; choose one of "
                f"{list(self.config.decoder_windows)} contiguous latents"
            )

    # ---- encode / decode ------------------------------------------------------------------

    def encode(self, video: Tensor) -> DiagonalGaussian:
        """Video (B, 3, T, H, W) in [-1, 1] -> posterior over raw latents (B, C, T/8, H/8, W/8)."""
        self._check_video(video)
        batch, channels, frames, height, width = video.shape
        chunk = self.config.temporal_chunk
        num_chunks = frames // chunk
        # seed §3.1.2 minimal encoding (Alg. 1): chunks become batch elements.
        chunks = video.reshape(batch, channels, num_chunks, chunk, height, width)
        chunks = chunks.transpose(1, 2).reshape(batch * num_chunks, channels, chunk, height, width)
        parameters = self.encoder(chunks)  # (B*n, 2C, 1, h, w)
        parameters = parameters.reshape(batch, num_chunks, *parameters.shape[1:])
        parameters = parameters.squeeze(3).transpose(1, 2)  # (B, 2C, n, h, w)
        return DiagonalGaussian.from_parameters(parameters)

    def _decode_windows(self, latents: Tensor, window: int) -> Tensor:
        """Decode latents (B, C, k*window, h, w) as k independent windows -> (B, 3, 8*k*window, H, W)."""
        batch, channels, latent_frames, height, width = latents.shape
        num_windows = latent_frames // window
        windows = latents.reshape(batch, channels, num_windows, window, height, width)
        windows = windows.transpose(1, 2).reshape(batch * num_windows, channels, window, height, width)
        frames = self.decoder(windows)  # (B*k, 3, 8*window, H, W)
        frames = frames.reshape(batch, num_windows, *frames.shape[1:]).transpose(1, 2)
        return frames.flatten(2, 3)  # (B, 3, 8*k*window, H, W)

    def decode(self, latents: Tensor, window: int = 8) -> Tensor:
        """Raw latents (B, C, t, h, w) -> video (B, 3, 8t, 8h, 8w), decoding `window` latents at once.

        seed §3.1.2 sharing decoder: windows of contiguous latents go through the decoder as
        separate batch elements; when t is not a multiple of the window, the last t % window
        latents are decoded as one shorter window.
        """
        self._check_latents(latents, window)
        latent_frames = latents.shape[2]
        full = (latent_frames // window) * window
        pieces = []
        if full:
            pieces.append(self._decode_windows(latents[:, :, :full], window))
        if full < latent_frames:
            remainder = latent_frames - full
            pieces.append(self._decode_windows(latents[:, :, full:], remainder))
        return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]

    def forward(
        self,
        video: Tensor,
        window: int = 8,
        generator: torch.Generator | None = None,
        sample_posterior: bool = True,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Training pass: encode, draw z ~ q(z|x) (or take the mode), decode. Returns (recon, posterior)."""
        posterior = self.encode(video)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(latents, window=window), posterior

    # ---- normalised latent interface (what the DiT sees) ---------------------------------

    def _per_channel(self, stats: Tensor, like: Tensor) -> Tensor:
        if like.ndim < 4 or like.shape[-4] != stats.shape[0]:
            raise MugenError(
                f"latents have shape {tuple(like.shape)}; expected (B, {stats.shape[0]}, t, h, w)"
            )
        return stats.to(like.dtype).reshape(-1, 1, 1, 1)  # broadcasts over (B, C, T, H, W)

    def normalize_latents(self, z: Tensor) -> Tensor:
        """(z - shift) / scale per channel."""
        return (z - self._per_channel(self.latent_shift, z)) / self._per_channel(self.latent_scale, z)

    def denormalize_latents(self, z: Tensor) -> Tensor:
        """Inverse of `normalize_latents`: z * scale + shift per channel."""
        return z * self._per_channel(self.latent_scale, z) + self._per_channel(self.latent_shift, z)

    def encode_to_latents(
        self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Video (B, 3, T, H, W) -> normalised latents (B, C, T/8, H/8, W/8); mode unless `sample`."""
        posterior = self.encode(video)
        latents = posterior.sample(generator) if sample else posterior.mode()
        return self.normalize_latents(latents)

    def decode_from_latents(self, latents: Tensor, window: int = 8) -> Tensor:
        """Normalised latents -> video in [-1, 1]."""
        return self.decode(self.denormalize_latents(latents), window=window).clamp(-1.0, 1.0)

    def encode_images(
        self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images (B, 3, H, W) -> normalised latents (B, C, 1, H/8, W/8).

        An image is one 8-frame chunk of the repeated frame, so image and video latents share one
        space (seed §3.1.2: the minimal principle covers stills and frame conditioning).
        """
        if images.ndim != 4:
            raise MugenError(
                f"images have shape {tuple(images.shape)}; expected (B, {self.config.in_channels}, "
                "H, W); pass videos to encode_to_latents instead"
            )
        chunk = images.unsqueeze(2).expand(-1, -1, self.config.temporal_chunk, -1, -1)
        return self.encode_to_latents(chunk, sample=sample, generator=generator)  # (B, C, 1, h, w)

    @torch.no_grad()
    def set_latent_statistics(self, shift: Tensor, scale: Tensor) -> None:
        channels = self.config.latent_channels
        shift = torch.as_tensor(shift, dtype=torch.float32)
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if shift.shape != (channels,) or scale.shape != (channels,):
            raise MugenError(
                f"latent statistics have shapes shift={tuple(shift.shape)}, scale="
                f"{tuple(scale.shape)}; both must be ({channels},), one value per latent channel"
            )
        if not (torch.isfinite(shift).all() and torch.isfinite(scale).all() and (scale > 0).all()):
            raise MugenError(
                "latent statistics must be finite with every scale > 0; re-estimate them on "
                "non-constant videos with estimate_latent_statistics"
            )
        self.latent_shift.copy_(shift)
        self.latent_scale.copy_(scale)

    @property
    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())

    # ---- checkpoints ----------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` (weights + latent statistics) atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, **asdict(self.config)}
        write_atomically(
            directory / CONFIG_NAME,
            lambda path: path.write_text(json.dumps(config, indent=2) + "\n"),
        )
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        write_atomically(
            directory / WEIGHTS_NAME,
            lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "VideoVAE":
        """Load a directory written by `save_pretrained`; the model comes back in eval mode."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (directory, config_path, weights_path):
            if not path.exists():
                raise MugenError(
                    f"Video VAE checkpoint path {path} does not exist; pass a directory written by "
                    "VideoVAE.save_pretrained (config.json + model.safetensors)"
                )
        config = _read_config(config_path)
        model = cls(config)
        try:
            state = load_file(str(weights_path), device="cpu")
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise MugenError(
                f"cannot read Video VAE weights {weights_path}: {error}; re-save the checkpoint"
            ) from error
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{name} {tuple(state[name].shape)} != {tuple(expected[name].shape)}"
            for name in expected
            if name in state and state[name].shape != expected[name].shape
        ]
        if missing or unexpected or mismatched:
            details = "; ".join(
                part
                for part in (
                    f"missing {missing[:3]}" if missing else "",
                    f"unexpected {unexpected[:3]}" if unexpected else "",
                    f"wrong shapes {mismatched[:3]}" if mismatched else "",
                )
                if part
            )
            raise MugenError(
                f"Video VAE weights {weights_path} do not match {config_path} ({details}); use the "
                "config.json saved with these weights"
            )
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()


def _read_config(config_path: Path) -> VideoVAEConfig:
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MugenError(
            f"cannot read Video VAE config {config_path}: {error}; re-save the checkpoint"
        ) from error
    known = {f.name for f in fields(VideoVAEConfig)}
    values = {k: v for k, v in raw.items() if not k.startswith("_")}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MugenError(
            f"Video VAE config {config_path} has unknown fields {unknown}; it was written by "
            "another model or version"
        )
    return VideoVAEConfig(**values)


@torch.no_grad()
def estimate_latent_statistics(vae: VideoVAE, videos: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of the raw posterior means over `videos` (each (B, 3, T, H, W)).

    Use the result as `vae.set_latent_statistics(shift=mean, scale=std)` so that normalised
    latents have zero mean and unit variance per channel. Accumulates in float64.
    """
    parameter = next(vae.parameters())
    channels = vae.config.latent_channels
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for video in tqdm(videos, desc="latent statistics", unit="batch", leave=False):
        video = video.to(device=parameter.device, dtype=parameter.dtype)
        means = vae.encode(video).mean.double().cpu()  # (B, C, t, h, w)
        per_channel = means.transpose(0, 1).flatten(1)  # (C, B*t*h*w)
        total += per_channel.sum(dim=1)
        total_sq += per_channel.pow(2).sum(dim=1)
        count += per_channel.shape[1]
    if count == 0:
        raise MugenError(
            "estimate_latent_statistics got no videos; pass an iterable of (B, 3, T, H, W) tensors"
        )
    mean = total / count
    variance = (total_sq / count - mean.pow(2)).clamp_min(0.0)
    return mean.float(), variance.sqrt().float()
