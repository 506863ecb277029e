"""EDM2 power-function EMA tracked online, and exporting an EMA as a model file."""

import pytest
import torch
from torch import nn

from mugen.errors import MugenError
from mugen.train.checkpoint import load_model_weights
from mugen.train.ema import EMA, PowerFunctionEMA, save_averaged_weights
from mugen.train.posthoc_ema import gamma_from_sigma_rel


def test_power_ema_weighs_step_tau_by_the_integrated_profile():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = PowerFunctionEMA(model, sigma_rel=0.1)
    gamma = gamma_from_sigma_rel(0.1)
    seen = []
    generator = torch.Generator().manual_seed(3)
    for t in range(1, 8):
        with torch.no_grad():
            model.weight.add_(torch.randn(model.weight.shape, generator=generator))
        seen.append(model.weight.detach().clone())
        ema.update(model)
        expected = sum(((tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1)) * seen[tau - 1] for tau in range(1, t + 1))
        torch.testing.assert_close(ema.shadow["weight"], expected, rtol=1e-5, atol=1e-6)


def test_power_ema_refuses_a_state_of_another_width():
    model = nn.Linear(2, 2)
    state = PowerFunctionEMA(model, sigma_rel=0.05).state_dict()
    with pytest.raises(MugenError, match="sigma_rel"):
        PowerFunctionEMA(model, sigma_rel=0.10).load_state_dict(state)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(4))


def test_saved_ema_loads_into_the_model_with_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
        model.scale.mul_(3.0)
    ema.update(model)
    save_averaged_weights(ema, model, tmp_path / "ema.safetensors")
    fresh = Tied()
    load_model_weights(fresh, tmp_path / "ema.safetensors")
    torch.testing.assert_close(fresh.embed.weight, ema.shadow["embed.weight"])
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.scale, torch.full((4,), 3.0))
    assert not torch.equal(model.embed.weight, fresh.embed.weight)  # the model's own weights were not written
