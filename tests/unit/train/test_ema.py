import pytest
import torch
from regression_data import RegressionDataset, RegressionTask, stack_collate
from torch import nn

from mugen.data.sampling import ShapeBucketBatchSampler
from mugen.errors import MugenError
from mugen.train.ema import EMA, warmup_decay
from mugen.train.trainer import TrainConfig, Trainer


class LinearWithCounter(nn.Module):
    """A linear layer plus a float buffer and an integer buffer, to check buffers are copied."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))


def perturb(model, generator):
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
        model.scale.mul_(2.0)
        model.calls.add_(1)


def test_update_follows_the_recurrence_for_three_steps():
    torch.manual_seed(0)
    model = LinearWithCounter()
    ema = EMA(model, decay=0.9, warmup=False)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        perturb(model, generator)
        ema.update(model)
        for name, parameter in model.named_parameters():
            expected[name] = 0.9 * expected[name] + 0.1 * parameter.detach()
    for name, value in expected.items():
        torch.testing.assert_close(ema.shadow[name], value, rtol=1e-6, atol=1e-6)
    assert torch.equal(ema.shadow["scale"], model.scale) and ema.shadow["scale"][0] == 8.0
    assert ema.shadow["calls"].item() == 3
    assert ema.updates == 3


def test_warmup_uses_min_of_decay_and_one_plus_n_over_ten_plus_n():
    assert warmup_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.9999, 2) == pytest.approx(3 / 12)
    assert warmup_decay(0.5, 100) == 0.5
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.999)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first update: decay 2/11
    torch.testing.assert_close(ema.shadow["weight"], 2 / 11 * start + 9 / 11 * model.weight.detach())
    assert ema.current_decay() == pytest.approx(3 / 12)


def test_copy_to_and_state_round_trip():
    torch.manual_seed(0)
    model = LinearWithCounter()
    ema = EMA(model, decay=0.5, warmup=False)
    perturb(model, torch.Generator().manual_seed(2))
    ema.update(model)

    other_model = LinearWithCounter()
    other = EMA(other_model, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.warmup is False and other.updates == 1
    for name, tensor in ema.shadow.items():
        assert torch.equal(other.shadow[name], tensor)
    other.copy_to(other_model)
    for name, tensor in other_model.state_dict().items():
        assert torch.equal(tensor, ema.shadow[name])
    # The loaded shadow is a copy: updating one EMA does not move the other.
    perturb(model, torch.Generator().manual_seed(3))
    ema.update(model)
    assert not torch.equal(other.shadow["linear.weight"], ema.shadow["linear.weight"])


def test_mismatched_model_and_bad_decay_fail_clearly():
    ema = EMA(nn.Linear(2, 1))
    with pytest.raises(MugenError, match="differ from the EMA"):
        ema.update(nn.Sequential(nn.Linear(2, 1)))
    with pytest.raises(MugenError, match="decay=1.5"):
        EMA(nn.Linear(2, 1), decay=1.5)


# ------------------------------------------------------------------------- Trainer integration
def train_with_ema(output_dir, steps):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    ema = EMA(model, decay=0.8)
    dataset = RegressionDataset(count=32, in_features=4, out_features=2, bias=0.0)
    sampler = ShapeBucketBatchSampler([()] * len(dataset), batch_size=8)
    config = TrainConfig(steps=steps, lr=1e-2, decay="constant", log_every=4, checkpoint_every=0)
    trainer = Trainer(
        model,
        RegressionTask(),
        dataset,
        sampler,
        stack_collate,
        config,
        output_dir,
        extra_state=lambda: {"ema": ema},
        on_step_end=lambda step, model: ema.update(model),
    )
    trainer.fit()
    return ema, model


def test_trainer_resume_restores_the_ema_bitwise(tmp_path):
    uninterrupted, uninterrupted_model = train_with_ema(tmp_path / "one_go", steps=8)
    train_with_ema(tmp_path / "resumed", steps=4)
    resumed, _ = train_with_ema(tmp_path / "resumed", steps=8)  # a fresh EMA, restored from step 4

    assert uninterrupted.updates == resumed.updates == 8
    for name, tensor in uninterrupted.shadow.items():
        assert torch.equal(resumed.shadow[name], tensor)
    # The EMA lags the trained weights: it really averaged rather than copied.
    assert not torch.allclose(uninterrupted.shadow["weight"], uninterrupted_model.weight.detach())
