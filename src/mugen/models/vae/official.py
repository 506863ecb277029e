"""The VAE of the MUG-V 10B release (``vae.pt``), reimplemented to run it and to compare against it.

The released VAE is not the report's design (that one is ``mugen.models.vae.model.VideoVAE``, the
trainable default). It stacks two autoencoders:

1. **An image autoencoder** in the SDXL / PixArt-sigma VAE layout (4 levels, 128-256-512-512
   channels, 2 ResNet blocks per level going down, 3 going up, one self-attention block in the
   middle). The release cuts it at its 512-channel middle: encoding stops after the middle block
   (no ``conv_norm_out``/``conv_out``, no quant conv) and decoding starts at the middle block (no
   ``conv_in``). Features are multiplied by 0.18215 after encoding and divided by it before
   decoding. Frames go through it one by one, ``micro_batch_size`` (4) frames at a time.
2. **A temporal autoencoder** (MAGVIT-style 3D convolutions, no spatial resampling) over those
   512-channel features at H/8 x W/8: 8x in time, to 24 latent channels. The encoder sees every
   8 feature frames on their own (each group is a batch element); the decoder sees a whole chunk
   of latents at once.

Frame layout and chunking (``micro_frame_size`` = 48 frames = 6 latents): a clip of ``1 + 8k``
frames gets 7 copies of its first frame in front (so the first latent is the first frame as an
image), then the features are encoded 48 frames at a time. Decoding runs the temporal decoder on
6 latents at a time (48 frames), each chunk then goes frame by frame through the image decoder.
Latents are normalised per channel with the 24 released ``shift``/``scale`` values:
``(z - shift) / scale``.

``vae.pt`` is a plain ``{name: tensor}`` dict (``torch.save(model.state_dict())``) whose names this
module reproduces: ``spatial_vae.module.{encoder,decoder}.*`` (diffusers ``AutoencoderKL`` names,
including the encoder's ``conv_norm_out``/``conv_out`` and the decoder's ``conv_in``, which the
release stores but never runs), ``temporal_vae.{encoder,quant_conv,post_quant_conv,decoder}.*``,
``shift`` and ``scale`` (each (1, 24, 1, 1, 1)) and ``logvar`` (a training scalar, unused here).

Parity with the reference code is tested in ``tests/unit/models/vae/test_vae_official.py`` against
fixtures from ``scripts/make_reference_vae_fixtures.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from mugen.atomic import write_atomically, write_text_atomically
from mugen.errors import MugenError
from mugen.models.state_files import SAFETENSORS_SUFFIX, read_state_dict_file, state_dict_problems
from mugen.models.vae.frames import FRAMES_PER_LATENT

# The 24 per-channel statistics the release normalises latents with: (z - shift) / scale.
# (They are also stored in vae.pt, which overrides these defaults on loading.)
RELEASED_LATENT_SHIFT = (
    -0.0194091796875, 0.09619140625, -0.796875, 0.1591796875, -0.2578125, 0.359375,
    -0.3203125, -0.287109375, -0.0069580078125, 0.3046875, 0.310546875, -0.451171875,
    -0.1728515625, 0.369140625, 0.2177734375, -3.075599670410156e-05, 0.1630859375, -0.267578125,
    -0.1962890625, -0.1298828125, -0.28515625, -0.515625, 0.5859375, -0.34375,
)  # fmt: skip
RELEASED_LATENT_SCALE = (
    0.8817, 0.6523, 0.9152, 1.2117, 3.3516, 0.7528, 0.8177, 0.8637, 0.9075, 2.8875, 0.8980, 1.1202,
    1.0003, 2.5163, 0.6652, 1.2573, 0.7279, 1.0777, 1.5159, 0.8680, 1.1859, 1.0484, 2.4750, 1.5881,
)  # fmt: skip

CONFIG_SUFFIX = ".config.json"  # beside vae.pt, only for sizes other than the release's


@dataclass
class ReleasedVAEConfig:
    """Sizes of the released VAE; the defaults are the release. Smaller widths/depths keep its layout."""

    # Image autoencoder (SDXL / PixArt-sigma VAE layout; 4 levels = 8x spatial).
    image_channels: int = 3
    image_block_channels: tuple[int, ...] = (128, 256, 512, 512)
    image_layers_per_block: int = 2  # ResNet blocks per level going down (going up: one more)
    image_norm_groups: int = 32
    image_latent_channels: int = 4  # width of the stored, unused SDXL latent heads
    image_feature_scale: float = 0.18215  # features * this after encoding, / this before decoding
    # Temporal autoencoder over the image features (3 temporal halvings = 8x).
    temporal_filters: int = 128
    temporal_res_blocks: int = 4
    temporal_channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_norm_groups: int = 32
    latent_channels: int = 24
    # Release chunking: frames per temporal chunk (a multiple of 8), frames per image-VAE batch.
    micro_frame_size: int = 48
    micro_batch_size: int = 4

    def __post_init__(self) -> None:
        self.image_block_channels = tuple(self.image_block_channels)
        self.temporal_channel_multipliers = tuple(self.temporal_channel_multipliers)

    def validate(self) -> None:
        if len(self.image_block_channels) != 4:
            raise MugenError(
                f"image_block_channels={self.image_block_channels} must have 4 levels (the release's 8x "
                "spatial compression); change the widths, not the count"
            )
        if len(self.temporal_channel_multipliers) != 4:
            raise MugenError(
                f"temporal_channel_multipliers={self.temporal_channel_multipliers} must have 4 levels "
                "(the release's 8x temporal compression); change the values, not the count"
            )
        widths = {
            "image_block_channels": (self.image_block_channels, self.image_norm_groups),
            "temporal widths": (
                tuple(self.temporal_filters * m for m in self.temporal_channel_multipliers),
                self.temporal_norm_groups,
            ),
        }
        for what, (channels, groups) in widths.items():
            if groups < 1 or any(c < 1 or c % groups for c in channels):
                raise MugenError(f"{what} {channels} must be positive multiples of the norm groups ({groups})")
        if self.micro_frame_size < FRAMES_PER_LATENT or self.micro_frame_size % FRAMES_PER_LATENT:
            raise MugenError(
                f"micro_frame_size={self.micro_frame_size} must be a positive multiple of {FRAMES_PER_LATENT} "
                "(the release uses 48)"
            )
        if self.micro_batch_size < 1 or self.image_layers_per_block < 1 or self.temporal_res_blocks < 1:
            raise MugenError("micro_batch_size, image_layers_per_block and temporal_res_blocks must be >= 1")

    @property
    def feature_channels(self) -> int:
        """Channels of the image features the temporal autoencoder works on (512 in the release)."""
        return self.image_block_channels[-1]

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.image_block_channels) - 1)

    @property
    def latents_per_chunk(self) -> int:
        """Latents the temporal decoder sees together (6 in the release)."""
        return self.micro_frame_size // FRAMES_PER_LATENT

    def to_dict(self) -> dict:
        values = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: dict) -> "ReleasedVAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MugenError(f"ReleasedVAEConfig has no fields {unknown}; choose from {sorted(known)}")
        return cls(**values)


# =============================================================================================
# Image autoencoder (SDXL / PixArt-sigma layout, diffusers parameter names)
# =============================================================================================


class ImageResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 shortcut when the width changes (eps 1e-6)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:  # (N, C_in, H, W) -> (N, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class StridedDownsample(nn.Module):
    """Pad one zero row/column at the bottom/right, then a 3x3 conv with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class NearestUpsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ImageSelfAttention(nn.Module):
    """One-head self-attention over the H*W positions, residual (the SDXL VAE's middle attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C, H, W)
        batch, channels, height, width = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (N, 1, HW, C)
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # scale C^-0.5
        out = self.to_out[0](attended).transpose(1, 2).reshape(batch, channels, height, width)  # channels-last view
        # out first: the sum (and every conv after it) then keeps the channels-last layout, as in
        # the reference; on the CPU in bfloat16 the layout changes the convolutions' rounding.
        return out + x


class ImageMidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ImageResBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([ImageSelfAttention(channels, groups)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class ImageDownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ImageResBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([StridedDownsample(out_channels)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class ImageUpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ImageResBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([NearestUpsample(out_channels)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class ImageEncoder(nn.Module):
    """Frames (N, 3, H, W) -> middle-block features (N, C_feat, H/8, W/8)."""

    def __init__(self, config: ReleasedVAEConfig):
        super().__init__()
        channels, groups = config.image_block_channels, config.image_norm_groups
        self.conv_in = nn.Conv2d(config.image_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            ImageDownBlock(
                channels[max(i - 1, 0)], channels[i], config.image_layers_per_block, groups, downsample=i < len(channels) - 1
            )
            for i in range(len(channels))
        )
        self.mid_block = ImageMidBlock(channels[-1], groups)
        # Stored in vae.pt, never run: the release stops at the middle block.
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.image_latent_channels, 3, padding=1)

    def forward(self, frames: Tensor) -> Tensor:
        x = self.conv_in(frames)
        for block in self.down_blocks:
            x = block(x)
        return self.mid_block(x)


class ImageDecoder(nn.Module):
    """Middle-block features (N, C_feat, h, w) -> frames (N, 3, 8h, 8w)."""

    def __init__(self, config: ReleasedVAEConfig):
        super().__init__()
        channels, groups = config.image_block_channels, config.image_norm_groups
        # Stored in vae.pt, never run: the release starts decoding at the middle block.
        self.conv_in = nn.Conv2d(config.image_latent_channels, channels[-1], 3, padding=1)
        self.mid_block = ImageMidBlock(channels[-1], groups)
        reversed_channels = channels[::-1]
        self.up_blocks = nn.ModuleList(
            ImageUpBlock(
                reversed_channels[max(i - 1, 0)],
                reversed_channels[i],
                config.image_layers_per_block + 1,
                groups,
                upsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[0], config.image_channels, 3, padding=1)

    def forward(self, features: Tensor) -> Tensor:
        x = self.mid_block(features)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class ImageAutoencoder(nn.Module):
    def __init__(self, config: ReleasedVAEConfig):
        super().__init__()
        self.encoder = ImageEncoder(config)
        self.decoder = ImageDecoder(config)


class ImageAutoencoderHolder(nn.Module):
    """Holds the image autoencoder under ``module`` (the release's key prefix ``spatial_vae.module``)."""

    def __init__(self, config: ReleasedVAEConfig):
        super().__init__()
        self.module = ImageAutoencoder(config)


# =============================================================================================
# Temporal autoencoder (3D convolutions over the image features, 8x in time)
# =============================================================================================


class PaddedConv3d(nn.Module):
    """A 3D conv on zero-padded input: 'same' in H and W; in time, (k_t - stride) zero frames split
    front/back as (pad // 2, pad - pad // 2) (so symmetric for k_t = 3, stride 1, and one frame at
    the back for stride 2). Parameters under ``conv``, as in the release."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int], temporal_stride: int = 1, bias: bool = True
    ):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        time_pad = (kt - 1) + (1 - temporal_stride)
        front, back = time_pad // 2, time_pad - time_pad // 2
        if front == back:  # symmetric: the conv pads by itself (no padded copy of the input)
            self.padding = None
            conv_padding = (front, kh // 2, kw // 2)
        else:
            self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, front, back)
            conv_padding = 0
        self.conv = nn.Conv3d(
            in_channels, out_channels, (kt, kh, kw), stride=(temporal_stride, 1, 1), padding=conv_padding, bias=bias
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, T, H, W) -> (B, C_out, T / stride, H, W)
        if self.padding is not None:
            x = F.pad(x, self.padding)
        return self.conv(x)


class TemporalResBlock(nn.Module):
    """GroupNorm-SiLU-conv3d twice (no bias), 1x1x1 shortcut when the width changes.

    ``upsample_time`` first repeats every frame twice (nearest), the decoder's first upsampling."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, upsample_time: bool = False):
        super().__init__()
        self.upsample_time = upsample_time
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = PaddedConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = PaddedConv3d(out_channels, out_channels, 3, bias=False)
        self.conv3 = PaddedConv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, T, H, W) -> (B, C_out, T or 2T, H, W)
        if self.upsample_time:
            x = F.interpolate(x, scale_factor=(2.0, 1.0, 1.0), mode="nearest")
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv3 is None else self.conv3(x)
        return h + shortcut


class TemporalEncoder(nn.Module):
    """Features of 8 frames (N, C_feat, 8, h, w) -> posterior parameters (N, 2 * latent, 1, h, w)."""

    def __init__(self, config: ReleasedVAEConfig):
        super().__init__()
        filters, groups, depth = config.temporal_filters, config.temporal_norm_groups, config.temporal_res_blocks
        widths = [filters * m for m in config.temporal_channel_multipliers]
        self.conv_in = PaddedConv3d(config.feature_channels, filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        previous = filters
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(depth):
                blocks.append(TemporalResBlock(previous, width, groups))
                previous = width
            self.block_res_blocks.append(blocks)
            if level < len(widths) - 1:  # halve time after each of the first three levels
                self.conv_blocks.append(PaddedConv3d(width, width, 3, temporal_stride=2))
        self.res_blocks = nn.ModuleList(TemporalResBlock(previous, previous, groups) for _ in range(depth))
        self.norm1 = nn.GroupNorm(groups, previous)
        self.conv2 = PaddedConv3d(previous, 2 * config.latent_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.conv_blocks):
                x = self.conv_blocks[level](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    """Latents (B, latent, t, h, w) -> features (B, C_feat, 8t, h, w).

    Time doubles three times: a nearest-neighbour repeat before the first level, then twice a conv
    to 2x channels whose channel pairs become consecutive frames (depth-to-time)."""

    def __init__(self, config: ReleasedVAEConfig):
        super().__init__()
        filters, groups, depth = config.temporal_filters, config.temporal_norm_groups, config.temporal_res_blocks
        widths = [filters * m for m in config.temporal_channel_multipliers]
        top = widths[-1]
        self.conv1 = PaddedConv3d(config.latent_channels, top, 3)
        self.res_blocks = nn.ModuleList(TemporalResBlock(top, top, groups) for _ in range(depth))
        self.upsample_block = TemporalResBlock(top, top, groups, upsample_time=True)
        # Levels are stored lowest-first (block_res_blocks[0] is the last to run).
        levels: list[nn.ModuleList] = [nn.ModuleList() for _ in widths]
        # conv_blocks[i] runs after level i + 1; the first one is an identity (no time upsampling).
        depth_to_time: list[nn.Module] = [nn.Identity() for _ in widths[1:]]
        previous = top
        for level in reversed(range(len(widths))):
            for _ in range(depth):
                levels[level].append(TemporalResBlock(previous, widths[level], groups))
                previous = widths[level]
            if level > 1:
                depth_to_time[level - 1] = PaddedConv3d(previous, 2 * previous, 3)
        self.block_res_blocks = nn.ModuleList(levels)
        self.conv_blocks = nn.ModuleList(depth_to_time)
        self.norm1 = nn.GroupNorm(groups, previous)
        self.conv_out = PaddedConv3d(previous, config.feature_channels, 3)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        x = self.upsample_block(x)  # (B, C, 2t, h, w)
        for level in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[level]:
                x = block(x)
            if level > 0 and not isinstance(self.conv_blocks[level - 1], nn.Identity):
                x = self.conv_blocks[level - 1](x)  # (B, 2C, T, h, w), channel 2c + s -> frame 2T + s
                batch, channels, frames, height, width = x.shape
                x = x.reshape(batch, channels // 2, 2, frames, height, width).transpose(2, 3)
                x = x.reshape(batch, channels // 2, 2 * frames, height, width)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalAutoencoder(nn.Module):
    def __init__(self, config: ReleasedVAEConfig):
        super().__init__()
        latent = config.latent_channels
        self.encoder = TemporalEncoder(config)
        self.quant_conv = PaddedConv3d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = PaddedConv3d(latent, latent, 1)
        self.decoder = TemporalDecoder(config)


# =============================================================================================
# The released VAE
# =============================================================================================


class ReleasedVideoVAE(nn.Module):
    """The MUG-V 10B release's VAE: image autoencoder + temporal autoencoder, release chunking.

    Main calls (video in [-1, 1], latents normalised with the released shift/scale):

    * ``encode(video (B, 3, T, H, W), generator=None) -> (B, 24, T', H/8, W/8)``; ``T = 1 + 8k``
      gives ``1 + k`` latents (first frame on its own), ``T = 8k`` gives ``k``; samples the
      posterior as the release does (``sample_posterior=False``: its mean).
    * ``decode(latents, num_frames=None) -> (B, 3, num_frames or 8t, H, W)`` (not clamped).

    and mugen's VAE interface (``encode_to_latents``, ``encode_images``, ``decode_from_latents``)
    so that ``mugen.models.vae.frames.encode_clip``/``decode_clip`` work with it unchanged.
    """

    temporal_chunk = FRAMES_PER_LATENT

    def __init__(self, config: ReleasedVAEConfig | None = None):
        super().__init__()
        config = config or ReleasedVAEConfig()
        config.validate()
        self.config = config
        self.spatial_vae = ImageAutoencoderHolder(config)
        self.temporal_vae = TemporalAutoencoder(config)
        shape = (1, config.latent_channels, 1, 1, 1)
        if config.latent_channels == len(RELEASED_LATENT_SHIFT):
            shift, scale = torch.tensor(RELEASED_LATENT_SHIFT), torch.tensor(RELEASED_LATENT_SCALE)
        else:
            shift, scale = torch.zeros(config.latent_channels), torch.ones(config.latent_channels)
        self.register_buffer("shift", shift.reshape(shape))
        self.register_buffer("scale", scale.reshape(shape))
        self.logvar = nn.Parameter(torch.full((), 4.0), requires_grad=False)  # stored in vae.pt; training only

    # ---- properties mugen's callers use ----------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames ``encode`` gives for ``num_frames`` frames (105 -> 14, 73 -> 10, 8k -> k)."""
        if num_frames % FRAMES_PER_LATENT == 1:
            num_frames += FRAMES_PER_LATENT - 1
        return -(-num_frames // FRAMES_PER_LATENT)

    def _dtype(self) -> torch.dtype:
        return self.temporal_vae.quant_conv.conv.weight.dtype

    # ---- image autoencoder ------------------------------------------------------------------

    def encode_frames(self, video: Tensor) -> Tensor:
        """(B, 3, T, H, W) -> scaled image features (B, C_feat, T, H/8, W/8), 4 frames at a time."""
        batch, channels, frames, height, width = video.shape
        flat = video.transpose(1, 2).reshape(batch * frames, channels, height, width)  # (B*T, 3, H, W)
        encoder, step = self.spatial_vae.module.encoder, self.config.micro_batch_size
        features = torch.cat(
            [encoder(flat[i : i + step]).mul(self.config.image_feature_scale) for i in range(0, flat.shape[0], step)]
        )  # (B*T, C, h, w)
        return features.reshape(batch, frames, *features.shape[1:]).transpose(1, 2)

    def decode_frames(self, features: Tensor, out: Tensor | None = None) -> Tensor:
        """Scaled image features (B, C_feat, T, h, w) -> frames (B, 3, T, 8h, 8w), 4 frames at a time.

        ``out`` (B, 3, T, 8h, 8w), if given, receives the frames (no full-size intermediate)."""
        batch, channels, frames, height, width = features.shape
        factor, step = self.config.spatial_factor, self.config.micro_batch_size
        decoder = self.spatial_vae.module.decoder
        if out is None:
            out = features.new_empty(batch, self.config.image_channels, frames, height * factor, width * factor)
        flat = features.transpose(1, 2).reshape(batch * frames, channels, height, width)
        for start in range(0, flat.shape[0], step):
            decoded = decoder(flat[start : start + step] / self.config.image_feature_scale)  # (n, 3, H, W)
            for offset, frame in enumerate(decoded):
                b, t = divmod(start + offset, frames)
                out[b, :, t] = frame
        return out

    # ---- temporal autoencoder ---------------------------------------------------------------

    def temporal_posterior(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Features (B, C_feat, T, h, w) -> posterior (mean, logvar), each (B, 24, ceil(T/8), h, w).

        T is zero-padded in front to a multiple of 8; every 8 frames are encoded on their own."""
        pad = -features.shape[2] % FRAMES_PER_LATENT
        if pad:
            features = F.pad(features, (0, 0, 0, 0, pad, 0))
        batch, channels, frames, height, width = features.shape
        groups = frames // FRAMES_PER_LATENT
        chunks = features.reshape(batch, channels, groups, FRAMES_PER_LATENT, height, width)
        chunks = chunks.transpose(1, 2).reshape(batch * groups, channels, FRAMES_PER_LATENT, height, width)
        moments = self.temporal_vae.quant_conv(self.temporal_vae.encoder(chunks))  # (B*g, 2L, 1, h, w)
        moments = moments.reshape(batch, groups, -1, height, width).transpose(1, 2)  # (B, 2L, g, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def temporal_decode(self, z: Tensor, num_frames: int) -> Tensor:
        """Raw latents (B, 24, t, h, w) -> features (B, C_feat, num_frames, h, w); the first
        ``8t - num_frames`` decoded frames are dropped."""
        features = self.temporal_vae.decoder(self.temporal_vae.post_quant_conv(z))  # (B, C, 8t, h, w)
        drop = -num_frames % FRAMES_PER_LATENT
        return features[:, :, drop:]

    # ---- the release's encode / decode --------------------------------------------------------

    def _check_video(self, video: Tensor) -> None:
        factor = self.config.spatial_factor
        if video.ndim != 5 or video.shape[1] != self.config.image_channels or video.shape[2] < 1:
            raise MugenError(
                f"video has shape {tuple(video.shape)}; expected (B, {self.config.image_channels}, T, H, W) "
                "with values in [-1, 1] and T >= 1"
            )
        if video.shape[3] < factor or video.shape[4] < factor:
            raise MugenError(
                f"video has shape {tuple(video.shape)}; H and W must be at least {factor} (the image "
                f"autoencoder halves them 3 times); resize the frames"
            )

    def encode(self, video: Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True) -> Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, 24, T', H // 8, W // 8).

        As released: a clip of ``1 + 8k`` frames gets 7 copies of frame 0 in front (T' = 1 + k;
        T = 8k gives k), then the features are encoded ``micro_frame_size`` frames at a time, and
        the posterior is *sampled* (``mean + std * noise``): one float32 CPU draw of each chunk's
        shape, from ``generator`` or, if None, torch's global CPU RNG (so ``torch.manual_seed(s)``
        before both gives the reference's latent bit for bit). ``sample_posterior=False`` gives
        the posterior mean. H and W need not be multiples of 8 (the release's 1110 and 1108 are
        not): the strided convolutions floor them, 1110 -> 138 latents -> 1104 decoded pixels.
        """
        self._check_video(video)
        video = video.to(self._dtype())
        features = self.encode_frames(video)  # (B, C_feat, T, h, w)
        if features.shape[2] % FRAMES_PER_LATENT == 1:
            first = features[:, :, :1].expand(-1, -1, FRAMES_PER_LATENT - 1, -1, -1)
            features = torch.cat([first, features], dim=2)
        pieces = []
        for start in range(0, features.shape[2], self.config.micro_frame_size):
            mean, logvar = self.temporal_posterior(features[:, :, start : start + self.config.micro_frame_size])
            if sample_posterior:
                device = generator.device if generator is not None else torch.device("cpu")
                noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
                mean = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
            pieces.append(mean)
        z = torch.cat(pieces, dim=2)  # (B, 24, T', h, w)
        return (z - self.shift) / self.scale

    def decode(self, latents: Tensor, num_frames: int | None = None, chunk_latents: int | None = None) -> Tensor:
        """Normalised latents (B, 24, t, h, w) -> video (B, 3, num_frames, 8h, 8w), not clamped.

        As released: the temporal decoder runs on ``chunk_latents`` (default: the release's
        ``micro_frame_size / 8`` = 6) latents at a time; chunk i yields ``min(micro_frame_size,
        frames left)`` frames (a short chunk drops its first decoded frames). ``num_frames``
        defaults to 8t. Memory: only one chunk's features exist at a time, the image decoder
        runs ``micro_batch_size`` frames at a time and writes straight into the output.
        """
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels or latents.shape[2] < 1:
            raise MugenError(
                f"latents have shape {tuple(latents.shape)}; expected (B, {self.config.latent_channels}, t, h, w) with t >= 1"
            )
        chunk = chunk_latents or self.config.latents_per_chunk
        chunk_frames = chunk * FRAMES_PER_LATENT
        latent_frames = latents.shape[2]
        num_frames = FRAMES_PER_LATENT * latent_frames if num_frames is None else num_frames
        # Frames each chunk yields, as the release counts them: min(chunk frames, frames left),
        # reached by dropping the first (-n mod 8) of the chunk's 8 * latents decoded frames.
        per_chunk, left = [], num_frames
        for start in range(0, latent_frames, chunk):
            wanted = min(chunk_frames, left)
            decoded = FRAMES_PER_LATENT * min(chunk, latent_frames - start)
            if wanted < 1 or decoded - (-wanted % FRAMES_PER_LATENT) != wanted:
                raise MugenError(
                    f"num_frames={num_frames} does not fit {latent_frames} latents decoded {chunk} at a time; "
                    f"use num_frames in {FRAMES_PER_LATENT * (latent_frames - 1) + 1}..{FRAMES_PER_LATENT * latent_frames}"
                )
            per_chunk.append(wanted)
            left -= chunk_frames
        dtype = self._dtype()
        latents = latents.to(dtype)
        z = latents * self.scale.to(dtype) + self.shift.to(dtype)
        batch, _, _, height, width = z.shape
        factor = self.config.spatial_factor
        video = z.new_empty(batch, self.config.image_channels, num_frames, height * factor, width * factor)
        done = 0
        for index, start in enumerate(range(0, latent_frames, chunk)):
            features = self.temporal_decode(z[:, :, start : start + chunk], per_chunk[index])  # (B, C, n, h, w)
            self.decode_frames(features, out=video[:, :, done : done + features.shape[2]])
            done += features.shape[2]
        return video

    # ---- mugen's VAE interface (mugen.models.vae.frames) ------------------------------------

    def encode_to_latents(self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Video (B, 3, 8k, H, W) -> normalised latents (B, 24, k, H/8, W/8); mode unless ``sample``."""
        if video.ndim != 5 or video.shape[2] % FRAMES_PER_LATENT:
            raise MugenError(
                f"video has shape {tuple(video.shape)}; encode_to_latents takes (B, 3, T, H, W) with T a multiple "
                f"of {FRAMES_PER_LATENT}; use encode() or mugen.models.vae.frames.encode_clip for 1 + 8k frames"
            )
        return self.encode(video, generator=generator, sample_posterior=sample)

    def encode_images(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) -> normalised latents (B, 24, 1, H/8, W/8): 8 copies of the frame,
        as the release encodes its reference image."""
        if images.ndim != 4:
            raise MugenError(
                f"images have shape {tuple(images.shape)}; expected (B, {self.config.image_channels}, H, W)"
            )
        frames = images.unsqueeze(2).expand(-1, -1, FRAMES_PER_LATENT, -1, -1)
        return self.encode(frames, generator=generator, sample_posterior=sample)

    def decode_from_latents(self, latents: Tensor, window: int | None = None) -> Tensor:
        """Normalised latents (B, 24, t, h, w) -> video (B, 3, 8t, 8h, 8w) clamped to [-1, 1].

        ``window``: latents the temporal decoder sees together; default the release's chunk (6)."""
        return self.decode(latents, chunk_latents=window).clamp(-1.0, 1.0)

    @property
    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())


# =============================================================================================
# vae.pt
# =============================================================================================

_FILE_HINT = "pass the released MUG-V-inference vae.pt (or a .safetensors of the same state dict)"


def read_released_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read ``vae.pt`` (``torch.load(weights_only=True)``) or a ``.safetensors`` file onto the CPU."""
    return read_state_dict_file(
        path,
        "VAE checkpoint",
        expected=".pt (the released vae.pt) or .safetensors",
        missing_hint=_FILE_HINT,
        resave_hint="save it with torch.save(model.state_dict(), path)",
        wrapper_hint=_FILE_HINT,
    )


def is_released_state_dict(state_dict: dict[str, Tensor]) -> bool:
    return any(name.startswith("temporal_vae.") for name in state_dict) and any(
        name.startswith("spatial_vae.module.") for name in state_dict
    )


def describe_released_size(state_dict: dict[str, Tensor]) -> str:
    """The widths a released-layout state dict has (read from its shapes), for error messages."""
    try:
        image = [
            state_dict[f"spatial_vae.module.encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(4)
        ]
        filters = state_dict["temporal_vae.encoder.conv_in.conv.weight"].shape[0]
        latent = state_dict["temporal_vae.post_quant_conv.conv.weight"].shape[0]
    except KeyError:
        return "not the released VAE layout"
    return f"image widths {image}, temporal filters {filters}, {latent} latent channels"


def check_released_state_dict(state_dict: dict[str, Tensor], model: ReleasedVideoVAE, source: str) -> None:
    """Raise MugenError naming ``source`` unless every name and shape matches ``model`` both ways."""
    problems = state_dict_problems(state_dict, model.state_dict())
    if not problems:
        return
    config = model.config
    expected = (
        f"image widths {list(config.image_block_channels)}, temporal filters {config.temporal_filters}, "
        f"{config.latent_channels} latent channels"
    )
    raise MugenError(
        f"VAE checkpoint {source} does not fit the released VAE: {'; '.join(problems)}. The file has "
        f"{describe_released_size(state_dict)}; expected {expected}. Pass the released vae.pt, or the "
        f"ReleasedVAEConfig the file was saved with (as {released_config_path(source).name} beside it)"
    )


def released_config_path(path: str | os.PathLike) -> Path:
    """Where a non-release ``ReleasedVAEConfig`` is kept beside its weights: ``vae.pt`` -> ``vae.config.json``."""
    path = Path(path)
    return path.with_name(f"{path.stem}{CONFIG_SUFFIX}")


def read_released_config(path: str | os.PathLike) -> ReleasedVAEConfig:
    """The config beside ``path`` (``released_config_path``), or the release's sizes when there is none."""
    config_path = released_config_path(path)
    if not config_path.is_file():
        return ReleasedVAEConfig()
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise MugenError(f"cannot read VAE config {config_path}: {error}; fix or delete it (no file = the release's sizes)") from error
    if not isinstance(values, dict):
        raise MugenError(f"VAE config {config_path} holds a {type(values).__name__}, expected a JSON object of ReleasedVAEConfig fields")
    return ReleasedVAEConfig.from_dict(values)


def save_released_vae(model: ReleasedVideoVAE, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write the ``vae.pt`` layout (``torch.save`` of a plain ``{name: tensor}`` dict; ``.safetensors``
    by suffix), atomically. A model not of the release's sizes also gets ``<stem>.config.json``."""
    path = Path(path)
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous().clone()  # owns its storage: no views into the model
    config_path = released_config_path(path)
    if model.config != ReleasedVAEConfig():
        write_text_atomically(config_path, json.dumps(model.config.to_dict(), indent=2) + "\n")
    elif config_path.exists():
        config_path.unlink()  # a stale config would resize the release
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata={"format": "pt"}))
    return write_atomically(path, lambda temporary: torch.save(tensors, temporary))


def load_released_vae(
    path: str | os.PathLike,
    config: ReleasedVAEConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> ReleasedVideoVAE:
    """Build ``ReleasedVideoVAE`` and load ``vae.pt`` (or a ``.safetensors`` of it) strictly.

    ``config`` None: the config beside the file (``vae.config.json``, written by
    ``save_released_vae`` for reduced sizes) or else the release's sizes. The file's names are the
    model's names (no adapter). Returns the model in eval mode on ``device``, cast to ``dtype`` if
    given (the release runs it in bfloat16). Missing, truncated or differently sized files raise
    MugenError naming the file, what is wrong and what was expected.
    """
    config = config or read_released_config(path)
    state_dict = read_released_state_dict(path)
    with torch.device("meta"):
        model = ReleasedVideoVAE(config)
    check_released_state_dict(state_dict, model, str(path))
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.logvar.requires_grad_(False)
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def build_released_vae_random(
    config: ReleasedVAEConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> ReleasedVideoVAE:
    """The released VAE with PyTorch's default random init (for timing and memory, not pictures),
    built directly on ``device``; the global RNG is left as it was."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            model = ReleasedVideoVAE(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
