from collections import Counter

import numpy as np
import pytest

from mugen.data.balanced import (
    BalancedBatchSampler,
    SampleCost,
    assign_longest_first,
    dit_tokens_for_shape_key,
    imbalance,
)
from mugen.data.sampling import ShapeBucketBatchSampler
from mugen.errors import MugenError
from mugen.models.dit import dit_config
from mugen.train.flops import dit_forward_flops

# A skewed mix: half 360p images, a few long 720p videos (50k tokens) whose attention dominates.
SHAPES = [("image", 1, 46, 80), ("video", 3, 46, 80), ("video", 10, 46, 80), ("video", 14, 90, 160), ("video", 5, 90, 160)]
PROBABILITIES = [0.5, 0.25, 0.15, 0.04, 0.06]


@pytest.fixture(scope="module")
def skewed():
    rng = np.random.default_rng(0)
    keys = [SHAPES[i] for i in rng.choice(len(SHAPES), size=2000, p=PROBABILITIES)]
    tokens = [dit_tokens_for_shape_key(key) for key in keys]
    return keys, tokens, SampleCost.for_dit(dit_config("1B"))


def sampler(keys, tokens, cost, world_size=4, rank=0, micro_batches=4, **kwargs):
    return BalancedBatchSampler(keys, tokens, cost, micro_batches=micro_batches, world_size=world_size, rank=rank, seed=1, **kwargs)


def test_cost_for_dit_is_the_flop_polynomial():
    config = dit_config("1B")
    cost = SampleCost.for_dit(config, text_tokens=300)
    for tokens in (922, 9202, 50402):
        assert cost(tokens) * 1e9 == pytest.approx(dit_forward_flops(config, tokens, 300).training, rel=1e-9)
    assert cost(2 * 9202) > 2.2 * cost(9202)  # attention makes long sequences super-linear
    with pytest.raises(MugenError):
        SampleCost(1.0, 0.0, 0.0)


def test_tokens_for_shape_keys():
    assert dit_tokens_for_shape_key(("video", 10, 45, 80)) == 10 * 23 * 40 + 2  # 45 latent rows pad to 46
    assert dit_tokens_for_shape_key((1, 46, 80)) == 922


def test_longest_first_fills_every_rank_with_equal_counts():
    costs = [9.0, 1.0, 1.0, 1.0, 5.0, 4.0]
    assignment = assign_longest_first(costs, ranks=2, per_rank=3)
    assert sorted(len(units) for units in assignment) == [3, 3]
    assert sorted(i for units in assignment for i in units) == list(range(6))
    assert sorted(sum(costs[i] for i in units) for units in assignment) == [10.0, 11.0]


def test_balanced_ranks_and_micro_batches_on_skewed_shapes(skewed):
    """Stated bounds (W = 4 ranks x 4 micro-batches, a fixed seed): per-step rank cost within 15% of
    the mean, mean imbalance under 5%; a fixed-size shape-bucket sampler dealing batches round-robin
    is off by more than 100% on average."""
    keys, tokens, cost = skewed
    balanced = sampler(keys, tokens, cost)
    step = balanced.units_per_step
    plans = [balanced.step_plan(p) for p in range(0, balanced.units_per_epoch - step, step)]
    rank = [plan.rank_imbalance for plan in plans]
    micro = [plan.micro_batch_imbalance for plan in plans]
    assert max(rank) < 0.15 and np.mean(rank) < 0.05
    assert max(micro) < 0.15 and np.mean(micro) < 0.05
    # Every micro-batch holds one shape (it must stack into one tensor).
    for plan in plans:
        for batches in plan.rank_batches:
            assert len(batches) == 4
            assert all(len({keys[i] for i in batch}) == 1 for batch in batches)

    naive = ShapeBucketBatchSampler(keys, batch_size=2, seed=1).epoch_batches(0)
    naive_imbalance = []
    for start in range(0, len(naive) - step, step):
        group = naive[start : start + step]
        naive_imbalance.append(imbalance([sum(cost(tokens[i]) for batch in group[r::4] for i in batch) for r in range(4)]))
    assert np.mean(naive_imbalance) > 1.0


def test_token_cap_bounds_memory_of_cheap_buckets(skewed):
    keys, tokens, cost = skewed
    capped = sampler(keys, tokens, cost, max_tokens=50402)
    for key, size in zip(capped.bucket_keys, capped.bucket_batch_sizes):
        assert size * dit_tokens_for_shape_key(key) <= 50402 or size == 1
    uncapped = sampler(keys, tokens, cost)
    assert uncapped.bucket_batch_size(SHAPES[0]) > capped.bucket_batch_size(SHAPES[0])


def _consume(sampler_per_rank, steps):
    """Run all ranks for ``steps`` global steps; returns each step's units (all ranks), in rank order."""
    consumed = []
    iterators = [iter(s) for s in sampler_per_rank]
    for _ in range(steps):
        step = []
        for it, s in zip(iterators, sampler_per_rank):
            step.extend(next(it) for _ in range(s.micro_batches))
        consumed.append(step)
    return consumed


def test_deterministic_given_seed_and_epoch(skewed):
    keys, tokens, cost = skewed
    a = sampler(keys, tokens, cost).epoch_units(3)[0]
    b = sampler(keys, tokens, cost).epoch_units(3)[0]
    assert [u.tolist() for u in a] == [u.tolist() for u in b]
    assert [u.tolist() for u in sampler(keys, tokens, cost).epoch_units(4)[0]] != [u.tolist() for u in a]


def test_exact_resume_mid_epoch(skewed):
    keys, tokens, cost = skewed
    uninterrupted = _consume([sampler(keys, tokens, cost, rank=r) for r in range(4)], steps=7)
    first = [sampler(keys, tokens, cost, rank=r) for r in range(4)]
    head = _consume(first, steps=3)
    state = first[0].state_dict(position=3 * first[0].units_per_step)
    resumed = [sampler(keys, tokens, cost, rank=r) for r in range(4)]
    for s in resumed:
        s.load_state_dict(state)
    assert head + _consume(resumed, steps=4) == uninterrupted


def test_world_size_change_loses_and_repeats_no_sample(skewed):
    """Saved after 3 steps on 4 ranks, resumed on 2 ranks through the end of the epoch and beyond."""
    keys, tokens, cost = skewed
    four = [sampler(keys, tokens, cost, world_size=4, rank=r) for r in range(4)]
    before = _consume(four, steps=3)
    state = four[0].state_dict(position=3 * four[0].units_per_step)
    assert state["position"] == 48 and state["world_size"] == 4
    two = [sampler(keys, tokens, cost, world_size=2, rank=r) for r in range(2)]
    for s in two:
        s.load_state_dict(state)
    units_per_epoch = two[0].units_per_epoch
    steps_after = -(-(units_per_epoch - 48) // two[0].units_per_step) + 1  # into the next epoch
    after = _consume(two, steps=steps_after)
    consumed = [tuple(unit) for step in before + after for unit in step]
    stream = two[0].units_at(0, len(consumed))[0]
    assert Counter(consumed) == Counter(map(tuple, stream))  # exactly the stream's units, each once
    seen = Counter(i for unit in consumed for i in unit)
    epoch1 = Counter(i for unit in stream[units_per_epoch:] for i in unit)
    # Every sample exactly once in epoch 0; the samples seen twice are exactly epoch 1's first units.
    assert sorted(seen) == list(range(len(keys)))
    assert {i: n - 1 for i, n in seen.items() if n > 1} == dict(epoch1)


def test_resume_refuses_a_different_unit_definition(skewed):
    keys, tokens, cost = skewed
    state = sampler(keys, tokens, cost).state_dict()
    with pytest.raises(MugenError, match="units_per_epoch|bucket_batch_sizes"):
        sampler(keys, tokens, cost, batch_size=2).load_state_dict(state)
    with pytest.raises(MugenError, match="plain shape-bucket"):
        sampler(keys, tokens, cost).load_state_dict({"epoch": 0, "batches_done": 3})
    with pytest.raises(MugenError, match="--balanced"):
        ShapeBucketBatchSampler(keys, batch_size=2).load_state_dict(state)


def test_rank_out_of_range_is_a_user_error(skewed):
    keys, tokens, cost = skewed
    with pytest.raises(MugenError, match="rank=4"):
        sampler(keys, tokens, cost, world_size=4, rank=4)
