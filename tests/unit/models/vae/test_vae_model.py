"""VideoVAE: shapes, minimal encoding, decoder windows, latent interface, checkpoints, errors."""

import json

import pytest
import torch
from torch import nn

from mugen.errors import MugenError
from mugen.models.vae import VideoVAE, estimate_latent_statistics, vae_config
from mugen.models.vae.model import CONFIG_NAME, WEIGHTS_NAME, Upsample


def randomised_tiny_vae(seed: int = 0) -> VideoVAE:
    """A tiny VAE whose zero-initialised layers are filled in, like a partly trained model.

    The fresh model deliberately decodes to exactly 0 (zero-init RGB head), which would make
    decoder tests vacuous; here every weight is random and non-zero.
    """
    torch.manual_seed(seed)
    vae = VideoVAE(vae_config("tiny"))
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                module.weight.mul_(0.5)
                nn.init.normal_(module.bias, std=0.1)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, mean=1.0, std=0.1)
                nn.init.normal_(module.bias, std=0.1)
    return vae.eval()


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    return randomised_tiny_vae()


def random_video(batch: int, frames: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=generator) * 2 - 1


# ---- shapes -------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("window", [1, 4, 8])
def test_encode_decode_shapes_for_each_window(vae, window):
    video = random_video(batch=2, frames=16, size=24)
    posterior = vae.encode(video)
    assert posterior.mean.shape == (2, 24, 2, 3, 3)
    assert posterior.logvar.shape == posterior.mean.shape
    recon = vae.decode(posterior.mode(), window=window)
    assert recon.shape == video.shape


@torch.no_grad()
@pytest.mark.parametrize("window, latent_frames", [(4, 5), (8, 3), (4, 9)])
def test_decode_with_remainder_window(vae, window, latent_frames):
    latents = torch.randn(1, 24, latent_frames, 2, 2, generator=torch.Generator().manual_seed(3))
    frames = vae.decode(latents, window=window)
    assert frames.shape == (1, 3, 8 * latent_frames, 16, 16)
    # The last latent_frames % window latents are one shorter window, decoded on their own.
    full = (latent_frames // window) * window
    if full:
        head = vae.decode(latents[:, :, :full], window=window)
        torch.testing.assert_close(frames[:, :, : 8 * full], head, rtol=1e-5, atol=1e-5)
    tail = vae.decode(latents[:, :, full:], window=window)  # fewer latents than the window
    torch.testing.assert_close(frames[:, :, 8 * full :], tail, rtol=1e-5, atol=1e-5)


# ---- seed §3.1.2 minimal encoding and the sharing decoder ---------------------------------


@torch.no_grad()
def test_minimal_encoding_chunks_are_independent(vae):
    video = random_video(batch=2, frames=24)
    edited = video.clone()
    edited[1, :, 8:16] = torch.rand(3, 8, 16, 16, generator=torch.Generator().manual_seed(9))
    before, after = vae.encode(video), vae.encode(edited)
    for field in ("mean", "logvar"):
        old, new = getattr(before, field), getattr(after, field)
        # Chunks 0 and 2 of sample 1, and all of sample 0: bit-for-bit unchanged.
        assert torch.equal(old[0], new[0])
        assert torch.equal(old[1, :, 0], new[1, :, 0])
        assert torch.equal(old[1, :, 2], new[1, :, 2])
        # The edited chunk's own latent moves.
        assert (old[1, :, 1] - new[1, :, 1]).abs().max() > 1e-3


@torch.no_grad()
def test_chunk_latent_equals_encoding_that_chunk_alone(vae):
    video = random_video(batch=1, frames=16)
    together = vae.encode(video).mean
    alone = vae.encode(video[:, :, 8:16].contiguous()).mean
    torch.testing.assert_close(together[:, :, 1:2], alone, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_decoder_windows_share_context_only_inside_a_window(vae):
    latents = torch.randn(1, 24, 8, 2, 2, generator=torch.Generator().manual_seed(4))
    edited = latents.clone()
    edited[:, :, 5] += 1.0  # latent 5 lies in the second window of 4
    out, out_edited = vae.decode(latents, window=4), vae.decode(edited, window=4)
    assert torch.equal(out[:, :, :32], out_edited[:, :, :32])
    assert (out[:, :, 32:40] - out_edited[:, :, 32:40]).abs().max() > 1e-4  # latent 4, same window
    # With one window of 8 the edit reaches the first latent's frames too.
    whole, whole_edited = vae.decode(latents, window=8), vae.decode(edited, window=8)
    assert (whole[:, :, :8] - whole_edited[:, :, :8]).abs().max() > 1e-4


@torch.no_grad()
def test_images_encode_as_one_repeated_chunk(vae):
    images = random_video(batch=2, frames=8)[:, :, 0]  # (2, 3, 16, 16)
    latents = vae.encode_images(images)
    assert latents.shape == (2, 24, 1, 2, 2)
    repeated = images.unsqueeze(2).repeat(1, 1, 8, 1, 1)
    torch.testing.assert_close(latents, vae.encode_to_latents(repeated), rtol=0, atol=0)


# ---- normalised latents -------------------------------------------------------------------


@torch.no_grad()
def test_normalize_denormalize_round_trip_and_formula():
    vae = VideoVAE(vae_config("tiny"))
    shift = torch.linspace(-1, 1, 24)
    scale = torch.linspace(0.5, 2.0, 24)
    vae.set_latent_statistics(shift, scale)
    z = torch.randn(2, 24, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    normalised = vae.normalize_latents(z)
    expected = (z - shift.view(1, 24, 1, 1, 1)) / scale.view(1, 24, 1, 1, 1)
    torch.testing.assert_close(normalised, expected)
    torch.testing.assert_close(vae.denormalize_latents(normalised), z, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_encode_to_latents_uses_mode_unless_sampling(vae):
    video = random_video(batch=1, frames=8)
    mode = vae.encode_to_latents(video)
    torch.testing.assert_close(mode, vae.normalize_latents(vae.encode(video).mean))
    first = vae.encode_to_latents(video, sample=True, generator=torch.Generator().manual_seed(0))
    again = vae.encode_to_latents(video, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    assert not torch.equal(first, mode)


@torch.no_grad()
def test_decode_from_latents_denormalises_and_clamps(vae):
    latents = torch.randn(1, 24, 1, 2, 2, generator=torch.Generator().manual_seed(6)) * 5
    frames = vae.decode_from_latents(latents)
    assert frames.min() >= -1 and frames.max() <= 1
    expected = vae.decode(vae.denormalize_latents(latents)).clamp(-1, 1)
    torch.testing.assert_close(frames, expected)


@torch.no_grad()
def test_estimate_latent_statistics_normalises_to_zero_mean_unit_std():
    vae = randomised_tiny_vae(seed=2)
    batches = [random_video(batch=2, frames=8, seed=s) for s in range(3)]
    shift, scale = estimate_latent_statistics(vae, batches)
    means = torch.cat([vae.encode(b).mean for b in batches]).transpose(0, 1).flatten(1)  # (C, N)
    torch.testing.assert_close(shift, means.mean(dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scale, means.std(dim=1, unbiased=False), rtol=1e-4, atol=1e-5)
    vae.set_latent_statistics(shift, scale)
    normalised = torch.cat([vae.encode_to_latents(b) for b in batches]).transpose(0, 1).flatten(1)
    torch.testing.assert_close(normalised.mean(dim=1), torch.zeros(24), rtol=0, atol=1e-4)
    torch.testing.assert_close(normalised.std(dim=1, unbiased=False), torch.ones(24), rtol=0, atol=1e-3)
    with pytest.raises(MugenError, match="no videos"):
        estimate_latent_statistics(vae, [])


def test_set_latent_statistics_rejects_bad_values():
    vae = VideoVAE(vae_config("tiny"))
    with pytest.raises(MugenError, match=r"\(24,\)"):
        vae.set_latent_statistics(torch.zeros(23), torch.ones(23))
    with pytest.raises(MugenError, match="scale > 0"):
        vae.set_latent_statistics(torch.zeros(24), torch.zeros(24))


# ---- initialisation -----------------------------------------------------------------------


@torch.no_grad()
def test_fresh_model_starts_quiet_and_stable():
    vae = VideoVAE(vae_config("tiny"))
    video = random_video(batch=1, frames=8)
    recon, posterior = vae(video, generator=torch.Generator().manual_seed(0))
    assert torch.equal(recon, torch.zeros_like(recon))  # zero-init RGB head
    torch.testing.assert_close(posterior.std, torch.full_like(posterior.std, torch.exp(torch.tensor(-3.0)).item()))
    assert torch.isfinite(posterior.mean).all() and 0.05 < posterior.mean.std() < 20
    for module in vae.modules():
        if isinstance(module, Upsample):
            weight = module.temporal.conv.weight
            half = weight.shape[0] // 2
            assert torch.equal(weight[:half], weight[half:])  # starts as nearest upsampling in time


# ---- checkpoints --------------------------------------------------------------------------


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path):
    vae = randomised_tiny_vae(seed=3)
    vae.set_latent_statistics(torch.linspace(-0.5, 0.5, 24), torch.linspace(0.8, 1.6, 24))
    vae.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = VideoVAE.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == vae.config
    assert not loaded.training
    assert torch.equal(loaded.latent_shift, vae.latent_shift)
    assert torch.equal(loaded.latent_scale, vae.latent_scale)
    video = random_video(batch=1, frames=16)
    assert torch.equal(loaded.encode_to_latents(video), vae.encode_to_latents(video))
    latents = vae.encode_to_latents(video)
    assert torch.equal(loaded.decode_from_latents(latents, 1), vae.decode_from_latents(latents, 1))


def test_from_pretrained_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MugenError, match="nowhere"):
        VideoVAE.from_pretrained(missing)
    vae = VideoVAE(vae_config("tiny"))
    vae.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / WEIGHTS_NAME).rename(tmp_path / "weights.bak")
    with pytest.raises(MugenError, match=WEIGHTS_NAME):
        VideoVAE.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "weights.bak").rename(tmp_path / "ckpt" / WEIGHTS_NAME)
    config_path = tmp_path / "ckpt" / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["base_channels"] = 8  # weights were saved for 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(MugenError, match="wrong shapes") as error:
        VideoVAE.from_pretrained(tmp_path / "ckpt")
    assert str(tmp_path / "ckpt" / WEIGHTS_NAME) in str(error.value)


# ---- user mistakes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, rule",
    [
        ((1, 3, 12, 16, 16), "multiple of 8"),
        ((1, 3, 8, 12, 16), "multiple of 8"),
        ((1, 3, 8, 16, 20), "multiple of 8"),
        ((1, 3, 0, 16, 16), "multiple of 8"),
        ((1, 4, 8, 16, 16), r"\(B, 3, T, H, W\)"),
        ((3, 8, 16, 16), r"\(B, 3, T, H, W\)"),
    ],
)
def test_encode_rejects_bad_shapes(vae, shape, rule):
    with pytest.raises(MugenError, match=rule) as error:
        vae.encode(torch.zeros(shape))
    assert str(tuple(shape)) in str(error.value)


@pytest.mark.parametrize("window", [0, 2, 3, 16])
def test_decode_rejects_bad_window(vae, window):
    with pytest.raises(MugenError, match=f"window={window}"):
        vae.decode(torch.zeros(1, 24, 4, 2, 2), window=window)


def test_decode_and_images_reject_bad_shapes(vae):
    with pytest.raises(MugenError, match="latents"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(MugenError, match="images"):
        vae.encode_images(torch.zeros(1, 3, 8, 16, 16))
