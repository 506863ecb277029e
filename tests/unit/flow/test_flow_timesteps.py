"""Resolution shift, logit-normal training times and the shifted sampling grid."""

import math

import pytest
import torch

from mugen.errors import MugenError
from mugen.flow.timesteps import (
    resolution_shift_ratio,
    sample_training_timesteps,
    sampling_schedule,
    shift_timesteps,
)


def test_resolution_shift_ratio_hand_values():
    assert resolution_shift_ratio(512, 512, 1) == pytest.approx(1.0)
    assert resolution_shift_ratio(1024, 1024, 1) == pytest.approx(2.0)
    # 720p: 1280 * 720 / 512^2 = 3.515625, sqrt = 1.875; 16 latent frames -> * 4
    assert resolution_shift_ratio(720, 1280, 16) == pytest.approx(7.5)
    assert resolution_shift_ratio(256, 256, 9) == pytest.approx(0.5 * 3.0)
    assert resolution_shift_ratio(512, 512, 1, base_resolution=256 * 256) == pytest.approx(2.0)


@pytest.mark.parametrize("height,width,frames", [(0, 512, 1), (512, -4, 1), (512, 512, 0), (512.5, 512, 1)])
def test_resolution_shift_ratio_rejects_bad_sizes(height, width, frames):
    with pytest.raises(MugenError, match="positive whole number"):
        resolution_shift_ratio(height, width, frames)


@pytest.mark.parametrize(
    "t,ratio,expected", [(0.5, 3.0, 0.75), (0.25, 2.0, 0.4), (0.5, 0.5, 1 / 3), (0.1, 4.0, 0.4 / 1.3)]
)
def test_shift_hand_values(t, ratio, expected):
    assert shift_timesteps(torch.tensor([t], dtype=torch.float64), ratio).item() == pytest.approx(expected, rel=1e-12)


def test_shift_identity_endpoints_and_monotone():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(shift_timesteps(t, 1.0), t)
    for ratio in (0.3, 2.0, 7.5):
        shifted = shift_timesteps(t, ratio)
        assert shifted[0].item() == 0.0 and shifted[-1].item() == 1.0
        assert bool((shifted.diff() > 0).all())
        # ratio > 1 moves every interior t towards noise (t = 1), ratio < 1 towards data
        interior_moved = shifted[1:-1] - t[1:-1]
        assert bool((interior_moved > 0).all()) if ratio > 1 else bool((interior_moved < 0).all())


def test_shift_per_sample_ratio_tensor():
    t = torch.tensor([0.5, 0.25, 0.5])
    ratio = torch.tensor([3.0, 2.0, 1.0])
    assert torch.allclose(shift_timesteps(t, ratio), torch.tensor([0.75, 0.4, 0.5]))


def test_shift_rejects_non_positive_ratio():
    with pytest.raises(MugenError, match="ratio"):
        shift_timesteps(torch.tensor([0.5]), 0.0)
    with pytest.raises(MugenError, match="ratio"):
        shift_timesteps(torch.tensor([0.5]), torch.tensor([1.0, -2.0]))


def test_training_timesteps_logit_normal_statistics():
    generator = torch.Generator().manual_seed(0)
    t = sample_training_timesteps(200_000, 1.0, generator=generator)
    assert t.shape == (200_000,) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    assert t.median().item() == pytest.approx(0.5, abs=0.01)
    logits = torch.logit(t.double())  # must be standard normal
    assert logits.mean().item() == pytest.approx(0.0, abs=0.01)
    assert logits.std().item() == pytest.approx(1.0, abs=0.01)
    # P(t < sigmoid(1)) = P(N(0,1) < 1)
    assert (t < torch.sigmoid(torch.tensor(1.0))).float().mean().item() == pytest.approx(0.8413, abs=0.005)


def test_training_timesteps_shifted_median_and_location():
    ratio = 3.0
    t = sample_training_timesteps(200_000, ratio, generator=torch.Generator().manual_seed(1))
    expected_median = shift_timesteps(torch.tensor([0.5]), ratio).item()  # 0.75
    assert t.median().item() == pytest.approx(expected_median, abs=0.01)
    t_located = sample_training_timesteps(200_000, 1.0, generator=torch.Generator().manual_seed(2), mean=0.5, std=0.5)
    assert t_located.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.01)
    assert torch.logit(t_located.double()).std().item() == pytest.approx(0.5, abs=0.01)


def test_training_timesteps_per_sample_ratio_is_shift_of_same_draw():
    ratio = torch.tensor([1.0, 2.0, 7.5, 0.5])
    unshifted = sample_training_timesteps(4, 1.0, generator=torch.Generator().manual_seed(3))
    shifted = sample_training_timesteps(4, ratio, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(shifted, ratio * unshifted / (1 + (ratio - 1) * unshifted))
    assert shifted[0].item() == unshifted[0].item()
    assert shifted[2].item() > unshifted[2].item() and shifted[3].item() < unshifted[3].item()


def test_training_timesteps_reproducible_and_validated():
    a = sample_training_timesteps(8, 2.0, generator=torch.Generator().manual_seed(5))
    b = sample_training_timesteps(8, 2.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(MugenError, match="ratio has shape"):
        sample_training_timesteps(8, torch.ones(3))
    with pytest.raises(MugenError, match="batch_size"):
        sample_training_timesteps(0, 1.0)


def test_sampling_schedule_hand_grid():
    # uniform 1, .75, .5, .25 shifted with r = 3 -> 1, .9, .75, .5; then the final 0
    schedule = sampling_schedule(4, 3.0)
    assert torch.allclose(schedule, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(sampling_schedule(2, 1.0), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("num_steps,ratio", [(1, 1.0), (25, 1.0), (25, 7.5), (50, 0.4), (7, 0.3), (3, 13.7)])
def test_sampling_schedule_endpoints_and_order(num_steps, ratio):
    schedule = sampling_schedule(num_steps, ratio)
    assert schedule.shape == (num_steps + 1,)
    assert schedule[0].item() == 1.0 and schedule[-1].item() == 0.0
    assert bool((schedule.diff() < 0).all())
    uniform = 1 - torch.arange(num_steps, dtype=torch.float64) / num_steps
    assert torch.allclose(schedule[:-1], ratio * uniform / (1 + (ratio - 1) * uniform))


def test_sampling_schedule_rejects_zero_steps():
    with pytest.raises(MugenError, match="num_steps"):
        sampling_schedule(0, 1.0)
