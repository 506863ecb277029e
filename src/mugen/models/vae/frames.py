"""How clip frames map to latent frames (the frame layout every mugen VAE user shares).

A clip of ``1 + 8k`` frames becomes ``1 + k`` latent frames, the layout of the MUG-V release
(73 frames -> 10 latents, 105 -> 14):

* latent 0 encodes the first frame as an image (one 8-frame chunk of the repeated frame);
* latent i >= 1 encodes frames ``8(i-1)+1 .. 8i`` (seed §3.1.2: each chunk on its own).

An image is the case k = 0 (1 frame, 1 latent). Because the first frame has a latent of its own,
image-to-video conditioning is a mask on latent 0 (seed §3.2 "Image/frame conditioning"), and
text-to-video, image-to-video and images all share one layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mugen.errors import MugenError

FRAMES_PER_LATENT = 8


def latent_frames_for(num_frames: int, what: str = "num_frames") -> int:
    """Frames of a clip -> latent frames; anything but 1 + 8k is a user error."""
    if num_frames < 1 or (num_frames - 1) % FRAMES_PER_LATENT:
        below = 1 + FRAMES_PER_LATENT * max((num_frames - 1) // FRAMES_PER_LATENT, 0)
        raise MugenError(
            f"{what}={num_frames} cannot be encoded: clips need 1 + 8k frames (1, 9, 17, 25, ... 73, 105); "
            f"use {below} or {below + FRAMES_PER_LATENT}"
        )
    return 1 + (num_frames - 1) // FRAMES_PER_LATENT


def frames_for_latents(latent_frames: int) -> int:
    return 1 + FRAMES_PER_LATENT * (latent_frames - 1)


def encode_clip(vae, video: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """(B, 3, 1 + 8k, H, W) in [-1, 1] -> normalised latents (B, C, 1 + k, H/8, W/8).

    ``sample`` draws the chunk latents from the posterior; the first frame's latent is its mode.
    """
    latent_frames_for(video.shape[2], "clip frames")
    first = vae.encode_images(video[:, :, 0])  # (B, C, 1, h, w), posterior mode
    if video.shape[2] == 1:
        return first
    rest = vae.encode_to_latents(video[:, :, 1:], sample=sample, generator=generator)  # (B, C, k, h, w)
    return torch.cat([first, rest], dim=2)


def decode_clip(vae, latents: Tensor, window: int | None = None) -> Tensor:
    """Normalised latents (B, C, 1 + k, h, w) -> clip (B, 3, 1 + 8k, 8h, 8w) in [-1, 1].

    Latent 0 decodes to 8 frames of (ideally) one image; their mean is the first frame.
    ``window``: latents decoded together after the first; None = the VAE's own (8 for VideoVAE,
    the release's 6 for ReleasedVideoVAE).
    """
    first = vae.decode_from_latents(latents[:, :, :1], window=1).mean(dim=2, keepdim=True)  # (B, 3, 1, H, W)
    if latents.shape[2] == 1:
        return first
    rest = latents[:, :, 1:]
    rest = vae.decode_from_latents(rest) if window is None else vae.decode_from_latents(rest, window=window)  # (B, 3, 8k, H, W)
    return torch.cat([first, rest], dim=2)
