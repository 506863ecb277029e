import math

import pytest
import torch

from mugen.errors import MugenError
from mugen.train.lr_schedule import build_lr_lambda


def test_linear_warmup_reaches_the_peak_on_its_last_step():
    schedule = build_lr_lambda(warmup_steps=4, total_steps=20, decay="cosine", min_lr_ratio=0.1)
    assert [schedule(step) for step in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_decay_key_points():
    schedule = build_lr_lambda(warmup_steps=10, total_steps=110, decay="cosine", min_lr_ratio=0.2)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.2 + 0.8 * 0.5)  # half-way: cos(pi/2) = 0
    assert schedule(35) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert schedule(110) == pytest.approx(0.2)
    assert schedule(500) == pytest.approx(0.2)  # stays at the floor past the end
    values = [schedule(step) for step in range(10, 111)]
    assert all(later <= earlier for earlier, later in zip(values, values[1:]))


def test_linear_and_constant_decay():
    linear = build_lr_lambda(warmup_steps=0, total_steps=100, decay="linear", min_lr_ratio=0.0)
    assert linear(0) == pytest.approx(1.0)
    assert linear(25) == pytest.approx(0.75)
    assert linear(100) == pytest.approx(0.0)
    constant = build_lr_lambda(warmup_steps=2, total_steps=100, decay="constant")
    assert [constant(step) for step in (0, 1, 2, 50, 100)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])


def test_drives_lambda_lr():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    schedule = build_lr_lambda(warmup_steps=2, total_steps=6, decay="linear", min_lr_ratio=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.25, 0.5, 0.5, 0.375, 0.25, 0.125])


@pytest.mark.parametrize(
    "arguments",
    [
        dict(warmup_steps=0, total_steps=10, decay="step"),
        dict(warmup_steps=20, total_steps=10),
        dict(warmup_steps=0, total_steps=0),
        dict(warmup_steps=0, total_steps=10, min_lr_ratio=1.5),
    ],
)
def test_bad_arguments_fail_clearly(arguments):
    with pytest.raises(MugenError, match="lr schedule"):
        build_lr_lambda(**arguments)
