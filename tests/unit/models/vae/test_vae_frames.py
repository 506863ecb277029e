"""Frame layout: 1 + 8k frames <-> 1 + k latents, first frame encoded as an image."""

import pytest
import torch

from mugen.errors import MugenError
from mugen.models.vae.frames import decode_clip, encode_clip, frames_for_latents, latent_frames_for
from mugen.models.vae.model import VideoVAE
from mugen.models.vae.presets import vae_config


@pytest.mark.parametrize("frames,latents", [(1, 1), (9, 2), (17, 3), (73, 10), (105, 14)])
def test_frame_counts(frames, latents):
    assert latent_frames_for(frames) == latents
    assert frames_for_latents(latents) == frames


@pytest.mark.parametrize("frames", [0, 8, 10, 16, 72])
def test_other_frame_counts_are_user_errors_with_the_nearest_valid(frames):
    with pytest.raises(MugenError, match=r"1 \+ 8k"):
        latent_frames_for(frames)


def test_encode_clip_layout_and_independence():
    torch.manual_seed(0)
    vae = VideoVAE(vae_config("tiny")).eval()
    clip = torch.rand(1, 3, 17, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = encode_clip(vae, clip)
        assert latents.shape == (1, 24, 3, 4, 4)
        torch.testing.assert_close(latents[:, :, :1], vae.encode_images(clip[:, :, 0]))
        torch.testing.assert_close(latents[:, :, 1:], vae.encode_to_latents(clip[:, :, 1:]))
        changed = clip.clone()
        changed[:, :, 9:] = 0  # the second chunk only
        other = encode_clip(vae, changed)
        assert torch.equal(other[:, :, :2], latents[:, :, :2]) and not torch.equal(other[:, :, 2], latents[:, :, 2])
        frames = decode_clip(vae, latents)
    assert frames.shape == (1, 3, 17, 32, 32) and frames.abs().max() <= 1
