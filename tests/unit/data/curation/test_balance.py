"""Balancing weights (seed §2.1): inverse tag frequency with a temperature, against hand-computed values."""

import math

import pytest

from mugen.data.curation.balance import BalanceConfig, assign_sample_weights, balance_weights, clip_tags, tag_counts
from mugen.errors import MugenError


def test_inverse_frequency_matches_hand_computation():
    # Tag counts: a=3, b=1. "min" rule: clips with only a -> f=3; the clip with b -> f=1.
    tags = [["subject:a"], ["subject:a"], ["subject:a", "subject:b"]]
    weights = balance_weights(tags, BalanceConfig(temperature=1.0, max_weight=None))
    raw = [1 / 3, 1 / 3, 1 / 1]
    expected = [value * 3 / sum(raw) for value in raw]  # normalised to sum to the number of clips
    assert weights == pytest.approx(expected)
    assert sum(weights) == pytest.approx(3.0)


def test_temperature_interpolates_between_uniform_and_inverse_frequency():
    tags = [["scene:beach"]] * 4 + [["scene:forest"]]
    uniform = balance_weights(tags, BalanceConfig(temperature=0.0, max_weight=None))
    assert uniform == pytest.approx([1.0] * 5)
    half = balance_weights(tags, BalanceConfig(temperature=0.5, max_weight=None))
    raw = [4**-0.5] * 4 + [1.0]
    assert half == pytest.approx([value * 5 / sum(raw) for value in raw])
    full = balance_weights(tags, BalanceConfig(temperature=1.0, max_weight=None))
    # tau = 1: both groups get the same total weight
    assert sum(full[:4]) == pytest.approx(full[4])
    assert full[4] > half[4] > uniform[4]


def test_geomean_rule_and_untagged_group():
    tags = [["subject:a", "action:x"], ["subject:a"], [], []]
    # counts: subject:a=2, action:x=1, untagged=2; geomean of clip 0 = sqrt(2*1)
    weights = balance_weights(tags, BalanceConfig(temperature=1.0, combine="geomean", max_weight=None))
    raw = [1 / math.sqrt(2), 1 / 2, 1 / 2, 1 / 2]
    assert weights == pytest.approx([value * 4 / sum(raw) for value in raw])


def test_cap_limits_a_single_rare_clip():
    tags = [["subject:common"]] * 99 + [["subject:rare"]]
    capped = balance_weights(tags, BalanceConfig(temperature=1.0, max_weight=3.0))
    uncapped = balance_weights(tags, BalanceConfig(temperature=1.0, max_weight=None))
    assert uncapped[-1] > 40
    # by hand: raw 1/99 (x99) and 1, mean 0.02 -> relative 0.50505 and 50; cap 3; renormalise to 100
    common = (1 / 99) / 0.02
    scale = 100 / (99 * common + 3.0)
    assert capped[0] == pytest.approx(common * scale)
    assert capped[-1] == pytest.approx(3.0 * scale)
    assert sum(capped) == pytest.approx(100.0)


def test_rows_get_weights_only_when_kept():
    rows = [
        {"keep": True, "tag_subjects": ["dog"], "tag_actions": [], "tag_scenes": ["beach"]},
        {"keep": True, "tag_subjects": ["dog"], "tag_actions": [], "tag_scenes": []},
        {"keep": False, "tag_subjects": ["cat"], "tag_actions": [], "tag_scenes": []},
    ]
    assert clip_tags(rows[0]) == ["subject:dog", "scene:beach"]
    assert tag_counts(rows) == {"subject:dog": 2, "scene:beach": 1}
    assign_sample_weights(rows, BalanceConfig(temperature=1.0, max_weight=None))
    assert rows[2]["sample_weight"] == 0.0
    # clip 0: rarest tag beach (1) -> raw 1; clip 1: dog (2) -> raw 1/2
    assert rows[0]["sample_weight"] == pytest.approx(2 * 1 / 1.5)
    assert rows[1]["sample_weight"] == pytest.approx(2 * 0.5 / 1.5)


def test_bad_settings_are_user_errors():
    with pytest.raises(MugenError, match="temperature"):
        BalanceConfig(temperature=-1)
    with pytest.raises(MugenError, match="combine"):
        BalanceConfig(combine="max")
