from collections import Counter

import pytest

from mugen.data.sampling import ShapeBucketBatchSampler
from mugen.errors import MugenError

# 11 samples of one shape, 7 of another, 3 of a third, interleaved.
SHAPE_KEYS = [(8, 32, 32) if i % 3 else (1, 64, 64) for i in range(18)] + [(16, 32, 32)] * 3


def all_batches(sampler):
    return [list(batch) for batch in sampler]


def test_each_batch_has_one_shape_and_every_index_appears_once():
    sampler = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=4, seed=3)
    batches = all_batches(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert len({SHAPE_KEYS[i] for i in batch}) == 1
        assert 1 <= len(batch) <= 4
    assert Counter(i for batch in batches for i in batch) == Counter(range(len(SHAPE_KEYS)))


def test_drop_last_keeps_only_full_batches():
    sampler = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=4, drop_last=True)
    batches = all_batches(sampler)
    counts = Counter(SHAPE_KEYS)
    assert len(batches) == len(sampler) == sum(count // 4 for count in counts.values())
    assert all(len(batch) == 4 for batch in batches)


def test_batch_size_for_key_sets_each_bucket_size():
    sampler = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=2, batch_size_for_key={(1, 64, 64): 6})
    image_batches = [batch for batch in sampler if SHAPE_KEYS[batch[0]] == (1, 64, 64)]
    assert [len(batch) for batch in image_batches] == [6]  # the 6 image samples fill exactly one batch
    video_sizes = Counter(len(batch) for batch in sampler.epoch_batches(0) if SHAPE_KEYS[batch[0]] != (1, 64, 64))
    assert video_sizes == Counter({2: 7, 1: 1})  # 12 + 3 video samples in batches of 2
    with pytest.raises(MugenError, match="batch_size_for_key"):
        ShapeBucketBatchSampler(SHAPE_KEYS, 2, batch_size_for_key={(2, 2, 2): 4})


def test_batches_are_a_function_of_seed_and_epoch():
    first = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=3, seed=7)
    second = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=3, seed=7)
    first.set_epoch(2)
    second.set_epoch(2)
    assert all_batches(first) == all_batches(second)

    first.set_epoch(3)
    second.set_epoch(2)
    assert all_batches(first) != all_batches(second)

    other_seed = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=3, seed=8)
    other_seed.set_epoch(2)
    second.set_epoch(2)
    assert all_batches(other_seed) != all_batches(second)


def test_one_epoch_per_iteration_and_set_epoch_restarts():
    sampler = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=4)
    assert len(all_batches(sampler)) == len(sampler)
    assert all_batches(sampler) == []  # the epoch is used up until set_epoch
    sampler.set_epoch(1)
    assert len(all_batches(sampler)) == len(sampler)


def test_without_shuffle_batches_follow_dataset_order():
    sampler = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=4, shuffle=False)
    flattened = [i for batch in sampler for i in batch]
    by_bucket = [i for key in dict.fromkeys(SHAPE_KEYS) for i, k in enumerate(SHAPE_KEYS) if k == key]
    assert flattened == by_bucket


def test_resume_mid_epoch_yields_exactly_the_remaining_batches():
    reference = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=3, seed=11)
    reference.set_epoch(4)
    expected = all_batches(reference)

    interrupted = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=3, seed=11)
    interrupted.set_epoch(4)
    iterator = iter(interrupted)
    consumed = [next(iterator) for _ in range(3)]
    state = interrupted.state_dict()
    assert state["epoch"] == 4 and state["batches_done"] == 3 and state["seed"] == 11

    resumed = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=3, seed=11)
    resumed.load_state_dict(state)
    assert consumed + all_batches(resumed) == expected


def test_state_dict_can_record_the_consumed_position():
    sampler = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=3)
    for _ in sampler:  # read ahead to the end, as a DataLoader with workers would
        pass
    state = sampler.state_dict(batches_done=2)
    resumed = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=3)
    resumed.load_state_dict(state)
    assert all_batches(resumed) == sampler.epoch_batches(0)[2:]


def test_loading_a_state_from_other_settings_fails_clearly():
    state = ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=3, seed=1).state_dict()
    with pytest.raises(MugenError, match="seed"):
        ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=3, seed=2).load_state_dict(state)
    with pytest.raises(MugenError, match="num_samples"):
        ShapeBucketBatchSampler(SHAPE_KEYS[:-1], batch_size=3, seed=1).load_state_dict(state)


def test_bad_arguments_fail_clearly():
    with pytest.raises(MugenError, match="empty"):
        ShapeBucketBatchSampler([], batch_size=2)
    with pytest.raises(MugenError, match="batch_size"):
        ShapeBucketBatchSampler(SHAPE_KEYS, batch_size=0)
