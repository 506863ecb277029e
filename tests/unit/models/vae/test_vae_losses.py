"""Video VAE objective (seed §4.1 eq. 1), adaptive weight map, PSNR and the Gaussian posterior."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from mugen.errors import MugenError
from mugen.models.vae import DiagonalGaussian, VAELossWeights, adaptive_weight_map, psnr, vae_loss
from mugen.models.vae.distributions import LOGVAR_MAX


# ---- DiagonalGaussian ---------------------------------------------------------------------


def test_kl_of_standard_normal_posterior_is_zero():
    posterior = DiagonalGaussian(torch.zeros(3, 24, 2, 4, 4), torch.zeros(3, 24, 2, 4, 4))
    kl = posterior.kl()
    assert kl.shape == (3,)
    assert torch.equal(kl, torch.zeros(3))


def test_kl_matches_torch_distributions_as_mean_per_element():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 24, 1, 3, 3, generator=generator)
    logvar = torch.randn(2, 24, 1, 3, 3, generator=generator)
    reference = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    expected = reference.flatten(1).mean(dim=1)
    torch.testing.assert_close(DiagonalGaussian(mean, logvar).kl(), expected)


def test_sample_is_reparameterised_and_reproducible():
    mean = torch.full((1, 24, 8, 16, 16), 2.0, requires_grad=True)
    logvar = torch.full((1, 24, 8, 16, 16), math.log(0.25), requires_grad=True)
    posterior = DiagonalGaussian(mean, logvar)
    first = posterior.sample(torch.Generator().manual_seed(7))
    assert torch.equal(first, posterior.sample(torch.Generator().manual_seed(7)))
    assert abs(first.mean().item() - 2.0) < 0.01 and abs(first.std().item() - 0.5) < 0.01
    first.sum().backward()
    assert mean.grad is not None and logvar.grad is not None and logvar.grad.abs().sum() > 0
    assert torch.equal(posterior.mode(), mean)


def test_logvar_is_clamped():
    posterior = DiagonalGaussian(torch.zeros(1, 2), torch.tensor([[100.0, -100.0]]))
    assert posterior.logvar.tolist() == [[LOGVAR_MAX, -30.0]]
    assert torch.isfinite(posterior.std).all()
    with pytest.raises(MugenError, match="same shape"):
        DiagonalGaussian(torch.zeros(1, 2), torch.zeros(1, 3))


# ---- vae_loss -----------------------------------------------------------------------------


def test_vae_loss_combines_weighted_terms_per_sample():
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(2, 3, 8, 8, 8, generator=generator) * 2 - 1
    recon = (target + 0.1 * torch.randn(target.shape, generator=generator)).requires_grad_()
    mean = torch.randn(2, 24, 1, 1, 1, generator=generator)
    posterior = DiagonalGaussian(mean, torch.zeros_like(mean))
    weights = VAELossWeights(mse=2.0, l1=0.5, kl=0.01)
    out = vae_loss(recon, target, posterior, weights)

    mse = (recon - target).pow(2).flatten(1).mean(1)
    l1 = (recon - target).abs().flatten(1).mean(1)
    kl = 0.5 * mean.pow(2).flatten(1).mean(1)  # var = 1, logvar = 0
    expected = 2.0 * mse + 0.5 * l1 + 0.01 * kl
    torch.testing.assert_close(out["per_sample"], expected)
    torch.testing.assert_close(out["loss"], expected.mean())
    torch.testing.assert_close(out["mse"], mse.mean())
    torch.testing.assert_close(out["l1"], l1.mean())
    torch.testing.assert_close(out["kl"], kl.mean())
    assert "adaptive_l1" not in out
    out["loss"].backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0


def test_vae_loss_adaptive_term_weights_moving_edges():
    target = torch.zeros(1, 1, 3, 5, 5)
    target[0, 0, 1, 2, 2] = 1.0  # a dot that appears for one frame
    recon_on_dot = target.clone()
    recon_on_dot[0, 0, 1, 2, 2] = 0.5  # same absolute error, on the salient pixel ...
    recon_off_dot = target.clone()
    recon_off_dot[0, 0, 1, 0, 4] = 0.5  # ... or on a flat corner
    posterior = DiagonalGaussian(torch.zeros(1, 24, 1, 1, 1), torch.zeros(1, 24, 1, 1, 1))
    weights = VAELossWeights(mse=0.0, l1=0.0, kl=0.0, adaptive_l1=1.0)
    on_dot = vae_loss(recon_on_dot, target, posterior, weights)
    off_dot = vae_loss(recon_off_dot, target, posterior, weights)
    assert on_dot["adaptive_l1"] > 0
    assert off_dot["adaptive_l1"] == 0  # the corner never changes, so it carries no weight
    plain = vae_loss(recon_on_dot, target, posterior, VAELossWeights(mse=0.0, l1=1.0, kl=0.0))
    # Map normalised to mean 1: it sums to 3 frames * 8 over 75 pixels, so the dot weighs 4 * 75 / 24.
    torch.testing.assert_close(on_dot["loss"], plain["l1"] * 4 * 75 / 24, rtol=1e-4, atol=0)


def test_vae_loss_rejects_mismatched_shapes():
    posterior = DiagonalGaussian(torch.zeros(1, 24, 1, 1, 1), torch.zeros(1, 24, 1, 1, 1))
    with pytest.raises(MugenError, match="differ in shape"):
        vae_loss(torch.zeros(1, 3, 8, 8, 8), torch.zeros(1, 3, 16, 8, 8), posterior, VAELossWeights())


# ---- adaptive_weight_map (seed §4.1) ------------------------------------------------------


def test_adaptive_weight_map_on_a_blinking_dot():
    video = torch.zeros(1, 1, 3, 5, 5)
    video[0, 0, 1, 2, 2] = 1.0  # frames: empty, dot, empty
    weights = adaptive_weight_map(video)
    assert weights.shape == video.shape
    # Laplacian of the dot frame: -4 at the dot, +1 at its four neighbours; 0 elsewhere.
    expected_frame = torch.zeros(5, 5)
    expected_frame[2, 2] = 4.0
    for row, col in [(1, 2), (3, 2), (2, 1), (2, 3)]:
        expected_frame[row, col] = 1.0
    for frame in range(3):  # |L1 - L0|, |L2 - L1|, and the last frame repeats the previous map
        torch.testing.assert_close(weights[0, 0, frame], expected_frame)


def test_adaptive_weight_map_ignores_static_content_and_flat_motion():
    generator = torch.Generator().manual_seed(2)
    static = torch.rand(2, 3, 1, 8, 8, generator=generator).expand(-1, -1, 4, -1, -1)
    assert torch.equal(adaptive_weight_map(static), torch.zeros(2, 3, 4, 8, 8))
    brightening = torch.linspace(0, 1, 4).view(1, 1, 4, 1, 1).expand(1, 3, 4, 8, 8)
    assert adaptive_weight_map(brightening).abs().max() == 0  # flat frames have no edges
    assert torch.equal(adaptive_weight_map(torch.rand(1, 3, 1, 8, 8)), torch.zeros(1, 3, 1, 8, 8))
    with pytest.raises(MugenError, match="expected a video"):
        adaptive_weight_map(torch.zeros(3, 8, 8))


def test_adaptive_weight_map_is_detached():
    video = torch.rand(1, 3, 4, 8, 8, requires_grad=True)
    assert not adaptive_weight_map(video).requires_grad


# ---- psnr ---------------------------------------------------------------------------------


def test_psnr_identical_is_infinite_and_constant_offset_is_known():
    target = torch.rand(3, 3, 8, 8, 8) * 2 - 1
    assert torch.isinf(psnr(target, target)).all()
    offsets = torch.tensor([0.1, 0.2, 0.02]).view(3, 1, 1, 1, 1)
    values = psnr(target + offsets, target)
    assert values.shape == (3,)
    expected = torch.tensor([10 * math.log10(4 / d**2) for d in (0.1, 0.2, 0.02)])
    torch.testing.assert_close(values, expected, rtol=1e-4, atol=1e-3)
    assert values[0] == pytest.approx(26.0206, abs=1e-3)
