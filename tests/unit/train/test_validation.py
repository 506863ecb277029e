"""Deterministic validation loss (quantile noise levels, fixed noise per sample)."""

import pytest
import torch

from mugen.flow.timesteps import resolution_shift_ratio
from mugen.models.dit import MUGDiT, dit_config
from mugen.train.validation import flow_validation_loss, validation_timesteps


def _samples(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"latents": torch.randn(24, 2, 4, 4, generator=g), "text_states": torch.randn(5, 16, generator=g), "text_mask": torch.ones(5, dtype=torch.bool), "fps": 8.0}
        for _ in range(count)
    ]


def test_levels_are_the_shifted_logit_normal_medians():
    levels = validation_timesteps(3, ratio=1.0)
    assert levels[1].item() == pytest.approx(0.5, abs=1e-7)  # the median of logit-normal(0, 1)
    assert torch.all(levels[1:] > levels[:-1])
    ratio = resolution_shift_ratio(64, 64, 3, 32 * 32)
    shifted = validation_timesteps(3, ratio)
    assert torch.all(shifted > levels)  # the shift moves every level towards noise


def test_loss_is_deterministic_and_independent_of_batch_size():
    torch.manual_seed(0)
    model = MUGDiT(dit_config("debug", text_dim=16, hidden_size=24, depth=1, num_heads=2))
    samples = _samples(5)
    a = flow_validation_loss(model, samples, num_levels=4, batch_size=3)
    b = flow_validation_loss(model, samples, num_levels=4, batch_size=20)
    assert a == pytest.approx(b, rel=1e-6)
    assert flow_validation_loss(model, samples, num_levels=4, seed=1) != pytest.approx(a, rel=1e-6)


def test_loss_matches_the_closed_form_for_a_zero_velocity_model():
    # A model whose velocity output is 0 has loss E|x0 - eps|^2 = E|x0|^2 + E|eps|^2 per element.
    torch.manual_seed(0)
    model = MUGDiT(dit_config("debug", text_dim=16, hidden_size=24, depth=1, num_heads=2))
    with torch.no_grad():
        model.final_layer.linear.weight.zero_()
        model.final_layer.linear.bias.zero_()
    samples = _samples(6)
    got = flow_validation_loss(model, samples, num_levels=8)
    expected = torch.stack([s["latents"] for s in samples]).pow(2).mean().item() + 1.0
    assert got == pytest.approx(expected, rel=0.05)
