"""The strategy demo's noisy captions and KTO labels (the GPU demonstration itself is in benchmarks/results/strategy_demo/)."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest

from mugen.data.synthetic import all_specs
from mugen.errors import MugenError
from mugen.strategy_demo import STRATEGY_PRESETS, kto_label_ok, noisy_caption_spec, run_strategy_demo, with_overrides


def _captions(direction_noise, colour_noise, seed="train"):
    rng, colour_rng = random.Random(f"{seed}-captions"), random.Random(f"{seed}-colour-captions")
    return [(spec, noisy_caption_spec(spec, rng, direction_noise, colour_rng, colour_noise)) for spec in all_specs() * 50]


def test_colour_noise_changes_only_the_colour_and_at_the_asked_rate():
    pairs = _captions(0.0, 0.5)
    wrong = Counter()
    for spec, caption in pairs:
        assert (caption.shape, caption.direction) == (spec.shape, spec.direction)
        wrong[caption.colour != spec.colour] += 1
    assert abs(wrong[True] / len(pairs) - 0.5) < 0.05  # 2,400 draws: 5 points is > 4 standard errors


def test_colour_noise_leaves_the_direction_noise_of_earlier_runs_unchanged():
    """Runs 2 and 3 (direction noise only) must be reproducible: the colour draws use their own generator."""
    without = _captions(0.5, 0.0)
    with_colour = _captions(0.5, 0.5)
    assert [c.direction for _, c in without] == [c.direction for _, c in with_colour]
    assert any(a.colour != b.colour for (_, a), (_, b) in zip(without, with_colour))


def test_kto_labels():
    spec = all_specs()[0]
    right = SimpleNamespace(colour=spec.colour, shape=spec.shape, direction=spec.direction)
    wrong_shape = SimpleNamespace(colour=spec.colour, shape="not-" + spec.shape, direction=spec.direction)
    wrong_colour = SimpleNamespace(colour="not-" + spec.colour, shape=spec.shape, direction=spec.direction)
    assert kto_label_ok("colour_and_shape", spec, right) and not kto_label_ok("colour_and_shape", spec, wrong_shape)
    assert kto_label_ok("colour", spec, wrong_shape) and not kto_label_ok("colour", spec, wrong_colour)
    with pytest.raises(MugenError, match="kto_label"):
        kto_label_ok("motion", spec, right)


def test_an_unknown_kto_label_fails_before_any_training(tmp_path):
    config = with_overrides(STRATEGY_PRESETS["cpu"], kto_label="motion")
    with pytest.raises(MugenError, match="kto_label='motion' is unknown"):
        run_strategy_demo(tmp_path, config)
    assert not any(tmp_path.iterdir())
