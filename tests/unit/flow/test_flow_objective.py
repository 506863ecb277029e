"""Flow path, masked per-sample loss, sample weights and loss-by-timestep bins."""

import pytest
import torch

from mugen.errors import MugenError
from mugen.flow.objective import FlowPathSample, flow_matching_loss, sample_flow_path, timestep_bin_losses


def _latents(seed: int, shape=(3, 2, 4, 3, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x0, noise


def test_flow_path_interpolates_and_targets_data_minus_noise():
    x0, noise = _latents(0)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    path = sample_flow_path(x0, t, noise)
    assert isinstance(path, FlowPathSample)
    assert torch.equal(path.x_t[0], x0[0])  # t = 0 is data
    assert torch.equal(path.x_t[2], noise[2])  # t = 1 is pure noise
    assert torch.allclose(path.x_t[1], 0.7 * x0[1] + 0.3 * noise[1])
    assert torch.equal(path.target_velocity, x0 - noise)
    assert path.t is t and path.noise is noise
    # moving along the target for time t from x_t lands on x0
    t_5d = t[:, None, None, None, None]
    assert torch.allclose(path.x_t + t_5d * path.target_velocity, x0)


def test_flow_path_conditioning_frames_hold_clean_data():
    x0, noise = _latents(1)
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    mask = torch.tensor([[True, False, False, False], [False, False, True, True], [False, False, False, False]])
    path = sample_flow_path(x0, t, noise, frame_cond_mask=mask)
    unconditioned = sample_flow_path(x0, t, noise)
    for sample in range(3):
        for frame in range(4):
            expected = x0 if mask[sample, frame] else unconditioned.x_t
            assert torch.equal(path.x_t[sample, :, frame], expected[sample, :, frame])


def _perfect_on_unmasked_garbage_on_masked(x0, noise, mask):
    def velocity_fn(x_t, t, frame_cond_mask):
        assert frame_cond_mask is mask
        perfect = x0 - noise
        garbage = torch.full_like(perfect, 1e6)
        return torch.where(frame_cond_mask[:, None, :, None, None], garbage, perfect)

    return velocity_fn


def test_loss_ignores_conditioning_frames():
    x0, noise = _latents(2)
    mask = torch.tensor([[True, False, False, False], [True, True, False, True], [False, False, False, False]])
    t = torch.tensor([0.4, 0.6, 0.8], dtype=torch.float64)
    velocity_fn = _perfect_on_unmasked_garbage_on_masked(x0, noise, mask)
    loss = flow_matching_loss(velocity_fn, x0, t, noise, frame_cond_mask=mask)
    assert loss.shape == (3,)
    assert torch.equal(loss, torch.zeros(3))
    # the same prediction without the mask is scored on every frame and is far from zero
    loss_unmasked = flow_matching_loss(lambda x_t, t, m: velocity_fn(x_t, t, mask), x0, t, noise)
    assert loss_unmasked[0].item() == pytest.approx(1e12 / 4, rel=1e-3)
    assert loss_unmasked[2].item() == 0.0


def test_loss_is_mean_over_unmasked_frames_per_sample_hand_computed():
    batch, channels, frames, height, width = 2, 2, 3, 1, 2
    x0 = torch.zeros(batch, channels, frames, height, width)
    noise = torch.zeros_like(x0)
    # the prediction misses the target (0) by a constant per frame: frame k of sample b is off by e[b, k]
    error = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 2.0]])
    prediction = error[:, None, :, None, None].expand_as(x0).clone()
    mask = torch.tensor([[True, False, False], [False, True, False]])
    seen = {}

    def velocity_fn(x_t, t, frame_cond_mask):
        seen["x_t"], seen["t"] = x_t, t
        return prediction

    t = torch.tensor([0.5, 0.25])
    loss = flow_matching_loss(velocity_fn, x0, t, noise, frame_cond_mask=mask)
    # sample 0 keeps frames 1, 2: (4 + 9) / 2; sample 1 keeps frames 0, 2: (16 + 4) / 2
    assert torch.allclose(loss, torch.tensor([6.5, 10.0]))
    assert torch.allclose(flow_matching_loss(velocity_fn, x0, t, noise), torch.tensor([14 / 3, 20 / 3]))
    assert torch.equal(seen["t"], t) and seen["x_t"].shape == x0.shape
    weights = torch.tensor([0.3, 2.0])
    weighted = flow_matching_loss(velocity_fn, x0, t, noise, frame_cond_mask=mask, sample_weight=weights)
    assert torch.allclose(weighted, torch.tensor([6.5 * 0.3, 20.0]))


def test_loss_matches_plain_mse_without_mask_and_has_gradients():
    x0, noise = _latents(3)
    x0, noise = x0.float(), noise.float()
    weight = torch.tensor(0.5, requires_grad=True)
    t = torch.tensor([0.1, 0.5, 0.9])
    loss = flow_matching_loss(lambda x_t, t, m: weight * x_t, x0, t, noise)
    x_t = (1 - t[:, None, None, None, None]) * x0 + t[:, None, None, None, None] * noise
    expected = ((0.5 * x_t - (x0 - noise)) ** 2).mean(dim=(1, 2, 3, 4))
    assert torch.allclose(loss, expected, rtol=1e-5)
    loss.sum().backward()
    assert weight.grad is not None and weight.grad.abs().item() > 0


def test_loss_validates_inputs():
    x0, noise = _latents(4)
    t = torch.full((3,), 0.5, dtype=torch.float64)

    def zero(x_t, t, m):
        return torch.zeros_like(x_t)

    with pytest.raises(MugenError, match="frame_cond_mask has shape"):
        flow_matching_loss(zero, x0, t, noise, frame_cond_mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(MugenError, match="torch.bool"):
        flow_matching_loss(zero, x0, t, noise, frame_cond_mask=torch.zeros(3, 4))
    with pytest.raises(MugenError, match="every frame"):
        flow_matching_loss(zero, x0, t, noise, frame_cond_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(MugenError, match="t has shape"):
        flow_matching_loss(zero, x0, t[:2], noise)
    with pytest.raises(MugenError, match="noise has shape"):
        flow_matching_loss(zero, x0, t, noise[:, :1])
    with pytest.raises(MugenError, match="sample_weight"):
        flow_matching_loss(zero, x0, t, noise, sample_weight=torch.ones(2))
    with pytest.raises(MugenError, match="velocity_fn returned"):
        flow_matching_loss(lambda x_t, t, m: x_t[:, :1], x0, t, noise)


def test_timestep_bin_losses_sums_and_counts():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    t = torch.tensor([0.05, 0.09, 0.5, 0.55, 1.0, 0.95])
    bins = timestep_bin_losses(loss, t, num_bins=10)
    assert set(bins) == {0, 5, 9}
    assert bins[0] == (pytest.approx(3.0), 2)
    assert bins[5] == (pytest.approx(7.0), 2)
    assert bins[9] == (pytest.approx(11.0), 2)  # t = 1 joins the last bin
    halves = timestep_bin_losses(loss, t, num_bins=2)
    assert halves == {0: (pytest.approx(3.0), 2), 1: (pytest.approx(18.0), 4)}
    assert sum(count for _, count in bins.values()) == 6
    with pytest.raises(MugenError, match="t must lie"):
        timestep_bin_losses(loss, t + 0.5)
    with pytest.raises(MugenError, match="num_bins"):
        timestep_bin_losses(loss, t, num_bins=0)
