"""Euler sampler: exact-flow Gaussian and point-mass cases, batched CFG, frame conditioning."""

import pytest
import torch

from mugen.errors import MugenError
from mugen.flow.sampler import FlowSamplerConfig, euler_sample
from mugen.flow.timesteps import sampling_schedule

LATENT_SHAPE = (2, 2, 2, 2)  # (C, T, H, W), tiny


def gaussian_data_velocity(mu: torch.Tensor, std: torch.Tensor):
    """Exact rectified-flow velocity E[x0 - eps | x_t] for data x0 ~ N(mu, std^2) per dimension.

    x_t = (1 - t) x0 + t eps is Gaussian with mean (1 - t) mu and variance (1 - t)^2 std^2 + t^2;
    v = x0 - eps has mean mu and Cov(v, x_t) = (1 - t) std^2 - t, so the conditional mean is
    mu + Cov(v, x_t) / Var(x_t) * (x_t - (1 - t) mu).
    """

    def velocity_fn(x_t, t, frame_cond_mask):
        t = t[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        variance = (1 - t) ** 2 * std**2 + t**2
        return mu + ((1 - t) * std**2 - t) / variance * (x_t - (1 - t) * mu)

    return velocity_fn


def gaussian_ode_solution(noise, mu, std):
    """Where the flow ODE takes ``noise`` at t = 1 when it reaches t = 0: mu + std * noise.

    The affine field keeps every marginal Gaussian and the map monotone, so the solution is
    x_t = (1 - t) mu + sigma_t noise with sigma_t = sqrt((1 - t)^2 std^2 + t^2).

    (Check: d/dt of that path is -mu + (t - (1 - t) std^2) / sigma_t * noise, which equals
    dx/dt = -E[v | x_t] from gaussian_data_velocity at that point.)
    """
    return mu + std * noise


def test_gaussian_closed_form_path_solves_the_flow_ode():
    # the test's own derivation: the claimed path has dx/dt = -v(x_t, t) (t runs down while v = x0 - eps)
    generator = torch.Generator().manual_seed(4)
    mu = torch.randn(LATENT_SHAPE, generator=generator, dtype=torch.float64)
    std = torch.rand(LATENT_SHAPE, generator=generator, dtype=torch.float64) + 0.2
    noise = torch.randn((5, *LATENT_SHAPE), generator=generator, dtype=torch.float64)
    velocity_fn = gaussian_data_velocity(mu, std)

    def path(t: float) -> torch.Tensor:
        return (1 - t) * mu + ((1 - t) ** 2 * std**2 + t**2) ** 0.5 * noise

    assert torch.allclose(path(1.0), noise) and torch.allclose(path(0.0), gaussian_ode_solution(noise, mu, std))
    step = 1e-5
    for t in (0.05, 0.3, 0.7, 0.99):
        derivative = (path(t + step) - path(t - step)) / (2 * step)
        velocity = velocity_fn(path(t), torch.full((5,), t, dtype=torch.float64), None)
        assert torch.allclose(derivative, -velocity, atol=1e-8)


@pytest.mark.parametrize("shift_ratio", [1.0, 3.0])
def test_euler_follows_exact_gaussian_flow(shift_ratio):
    generator = torch.Generator().manual_seed(0)
    mu = torch.rand(LATENT_SHAPE, generator=generator, dtype=torch.float64) * 4 - 2  # in [-2, 2)
    std = torch.rand(LATENT_SHAPE, generator=generator, dtype=torch.float64) * 1.7 + 0.3  # in [0.3, 2)
    batch = 1024
    noise = torch.randn((batch, *LATENT_SHAPE), generator=generator, dtype=torch.float64)
    velocity_fn = gaussian_data_velocity(mu, std)
    exact = gaussian_ode_solution(noise, mu, std)

    errors = {}
    for num_steps in (200, 400):
        config = FlowSamplerConfig(num_steps=num_steps, guidance_scale=1.0, shift_ratio=shift_ratio)
        samples = euler_sample(velocity_fn, noise, config)
        assert samples.shape == noise.shape and samples.dtype == torch.float64
        errors[num_steps] = (samples - exact).abs().max().item()
        # Euler is first order: the global error is O(1 / steps); 12 / steps bounds it for these mu, std
        assert errors[num_steps] < 12 / num_steps
        # sample statistics match the data distribution (sampling error ~ std / sqrt(batch), plus Euler error)
        tolerance = 5 / batch**0.5 + errors[num_steps] / std.min()
        assert ((samples.mean(dim=0) - mu) / std).abs().max().item() < tolerance
        assert (samples.std(dim=0) / std - 1).abs().max().item() < tolerance
    assert 0.45 < errors[400] / errors[200] < 0.55  # doubling the steps halves the error


@pytest.mark.parametrize("num_steps", [1, 2, 7, 30])
@pytest.mark.parametrize("shift_ratio", [0.5, 1.0, 7.5])
def test_point_mass_is_reached_exactly_for_any_steps_and_shift(num_steps, shift_ratio):
    # data x0 = c: x_t = (1 - t) c + t eps, so v = c - eps = (c - x_t) / t, and each Euler step
    # scales (z - c) by t_{i+1} / t_i; the final step to t = 0 lands exactly on c.
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(LATENT_SHAPE, generator=generator, dtype=torch.float64)
    noise = torch.randn((3, *LATENT_SHAPE), generator=generator, dtype=torch.float64)

    def velocity_fn(x_t, t, frame_cond_mask):
        return (target - x_t) / t[:, None, None, None, None]

    config = FlowSamplerConfig(num_steps=num_steps, guidance_scale=1.0, shift_ratio=shift_ratio)
    samples = euler_sample(velocity_fn, noise, config)
    assert torch.allclose(samples, target.expand_as(samples), atol=1e-12, rtol=0)
    samples32 = euler_sample(velocity_fn, noise.float(), config)
    assert samples32.dtype == torch.float32
    assert torch.allclose(samples32.double(), target.expand_as(samples), atol=1e-5, rtol=0)


def test_classifier_free_guidance_one_doubled_forward_per_step():
    generator = torch.Generator().manual_seed(2)
    batch = 2
    noise = torch.randn((batch, *LATENT_SHAPE), generator=generator)
    cond_direction = torch.randn((batch, *LATENT_SHAPE), generator=generator)
    uncond_direction = torch.randn((batch, *LATENT_SHAPE), generator=generator)
    calls = []

    def velocity_fn(x_t, t, frame_cond_mask):
        calls.append((x_t.clone(), t.clone(), frame_cond_mask))
        # first half: the prompt's velocity a(t); second half: the negative prompt's b(t)
        scale = t[:, None, None, None, None]
        return torch.cat([cond_direction, uncond_direction]) * scale

    guidance = 4.0
    config = FlowSamplerConfig(num_steps=1, guidance_scale=guidance, shift_ratio=1.0)
    one_step = euler_sample(velocity_fn, noise, config)
    # t = 1, dt = 1: z + (b + g (a - b)) * dt
    expected = noise + (uncond_direction + guidance * (cond_direction - uncond_direction))
    assert torch.allclose(one_step, expected, atol=1e-6)
    assert len(calls) == 1 and calls[0][0].shape == (2 * batch, *LATENT_SHAPE)
    assert calls[0][2] is None

    calls.clear()
    config = FlowSamplerConfig(num_steps=3, guidance_scale=guidance, shift_ratio=2.0)
    samples = euler_sample(velocity_fn, noise, config)
    schedule = sampling_schedule(3, 2.0)
    assert len(calls) == 3
    z = noise.clone()
    for step, (x_t, t, _) in enumerate(calls):
        assert x_t.shape == (2 * batch, *LATENT_SHAPE)
        assert torch.equal(x_t[:batch], x_t[batch:])  # the same latents in both halves
        assert torch.allclose(x_t[:batch], z, atol=1e-6)
        assert t.shape == (2 * batch,) and t.dtype == torch.float32
        assert torch.allclose(t, torch.full((2 * batch,), schedule[step].item()))
        t_now, t_next = schedule[step].item(), schedule[step + 1].item()
        guided = t_now * (uncond_direction + guidance * (cond_direction - uncond_direction))
        z = z + guided * (t_now - t_next)
    assert torch.allclose(samples, z, atol=1e-6)


def test_guidance_scale_one_uses_a_single_undoubled_forward():
    noise = torch.randn((3, *LATENT_SHAPE))
    batch_sizes = []

    def velocity_fn(x_t, t, frame_cond_mask):
        batch_sizes.append((x_t.shape[0], t.shape[0]))
        return -x_t

    samples = euler_sample(velocity_fn, noise, FlowSamplerConfig(num_steps=4, guidance_scale=1.0))
    assert batch_sizes == [(3, 3)] * 4
    # v = -z: each step multiplies z by 1 - dt = 1 - 1/4, four times
    assert torch.allclose(samples, noise * 0.75**4, atol=1e-6)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_conditioning_frames_are_imposed_and_other_frames_evolve(guidance_scale):
    generator = torch.Generator().manual_seed(3)
    channels, frames, height, width = 2, 4, 2, 3
    noise = torch.randn((2, channels, frames, height, width), generator=generator, dtype=torch.float64)
    cond_latents = torch.randn(noise.shape, generator=generator, dtype=torch.float64)
    target = torch.randn(noise.shape[1:], generator=generator, dtype=torch.float64)
    # sample 0: image-to-video (first latent frame); sample 1: any-frame conditioning
    mask = torch.tensor([[True, False, False, False], [False, True, False, True]])
    mask_5d = mask[:, None, :, None, None].expand_as(noise)
    masks_seen = []

    def velocity_fn(x_t, t, frame_cond_mask):
        masks_seen.append(frame_cond_mask)
        half = x_t.shape[0] // 2 if guidance_scale != 1.0 else x_t.shape[0]
        # the sampler hands the model clean conditioning latents on the masked frames at every step
        assert torch.equal(x_t[:half][mask_5d], cond_latents[mask_5d])
        return (target - x_t) / t[:, None, None, None, None]  # point mass at target, frame by frame

    config = FlowSamplerConfig(num_steps=5, guidance_scale=guidance_scale, shift_ratio=2.0)
    samples = euler_sample(velocity_fn, noise, config, cond_latents=cond_latents, frame_cond_mask=mask)
    assert torch.equal(samples[mask_5d], cond_latents[mask_5d])
    free = ~mask_5d
    assert torch.allclose(samples[free], target.expand_as(samples)[free], atol=1e-12)
    assert not torch.allclose(samples[free], noise[free])
    expected_mask = mask if guidance_scale == 1.0 else torch.cat([mask, mask])
    assert len(masks_seen) == 5 and all(torch.equal(m, expected_mask) for m in masks_seen)


def test_sampler_rejects_bad_inputs():
    noise = torch.randn((2, *LATENT_SHAPE))
    config = FlowSamplerConfig(num_steps=2, guidance_scale=1.0)

    def zero(x_t, t, m):
        return torch.zeros_like(x_t)

    mask = torch.zeros(2, LATENT_SHAPE[1], dtype=torch.bool)
    with pytest.raises(MugenError, match="go together"):
        euler_sample(zero, noise, config, frame_cond_mask=mask)
    with pytest.raises(MugenError, match="go together"):
        euler_sample(zero, noise, config, cond_latents=noise)
    with pytest.raises(MugenError, match="frame_cond_mask has shape"):
        euler_sample(zero, noise, config, cond_latents=noise, frame_cond_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(MugenError, match="torch.bool"):
        euler_sample(zero, noise, config, cond_latents=noise, frame_cond_mask=mask.float())
    with pytest.raises(MugenError, match="cond_latents has shape"):
        euler_sample(zero, noise, config, cond_latents=noise[:, :, :1], frame_cond_mask=mask)
    with pytest.raises(MugenError, match="5 dims"):
        euler_sample(zero, noise[0], config)
    with pytest.raises(MugenError, match="num_steps"):
        euler_sample(zero, noise, FlowSamplerConfig(num_steps=0))
    with pytest.raises(MugenError, match="shift_ratio"):
        euler_sample(zero, noise, FlowSamplerConfig(shift_ratio=-1.0))
    with pytest.raises(MugenError, match="velocity_fn returned shape"):
        euler_sample(lambda x_t, t, m: x_t[:1], noise, FlowSamplerConfig(num_steps=2, guidance_scale=2.0))
