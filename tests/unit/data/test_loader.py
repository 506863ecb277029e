import threading
import time

import pytest
import torch

from mugen.data.loader import PrefetchLoader
from mugen.errors import MugenError


def slow_source(count, delay, closed=None):
    """Batches that take ``delay`` seconds each to produce (like reading and decoding files)."""
    try:
        for index in range(count):
            time.sleep(delay)
            yield {"x": torch.full((2, 3), float(index)), "index": index}
    finally:
        if closed is not None:
            closed.set()


def wait_fraction(depth, steps=8, delay=0.04):
    """Consume with a step of ``delay`` seconds; returns (waited / elapsed, indices seen)."""
    loader = PrefetchLoader(slow_source(steps, delay), depth=depth)
    start = time.perf_counter()
    seen = []
    for batch in loader:
        seen.append(batch["index"])
        time.sleep(delay)  # the training step
    return loader.total_wait_s / (time.perf_counter() - start), seen


def test_prefetch_overlaps_a_slow_dataset_with_a_slow_step():
    synchronous, seen_sync = wait_fraction(depth=0)
    prefetched, seen = wait_fraction(depth=2)
    assert seen == seen_sync == list(range(8))
    # Without prefetch half the time is spent waiting; with it, only the first batch is waited for.
    assert synchronous > 0.4
    assert prefetched < 0.5 * synchronous


def test_errors_reach_the_consumer_and_stop_the_thread():
    def failing():
        yield {"x": torch.zeros(1)}
        yield {"x": torch.ones(1)}
        raise ValueError("corrupt latent file 'a.safetensors'")

    loader = PrefetchLoader(failing(), depth=2)
    assert float(next(loader)["x"]) == 0.0
    assert float(next(loader)["x"]) == 1.0
    with pytest.raises(ValueError, match="corrupt latent"):
        next(loader)
    assert not loader._thread.is_alive()
    with pytest.raises(StopIteration):
        next(loader)


def test_close_stops_an_endless_source_cleanly():
    closed = threading.Event()
    loader = PrefetchLoader(slow_source(10**9, 0.001, closed), depth=3)
    assert next(loader)["index"] == 0
    assert next(loader)["index"] == 1
    loader.close()
    assert not loader._thread.is_alive()
    assert closed.is_set()  # the source generator was closed (its files would be released)
    with pytest.raises(StopIteration):
        next(loader)


def test_synchronous_mode_measures_the_load_time():
    loader = PrefetchLoader(slow_source(3, 0.03), depth=0)
    batches = list(loader)
    assert [b["index"] for b in batches] == [0, 1, 2]
    assert loader.total_wait_s >= 3 * 0.03 * 0.9 and loader.batches == 3
    with pytest.raises(MugenError, match="depth"):
        PrefetchLoader([], depth=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and streams need CUDA")
def test_batches_arrive_on_the_gpu():
    loader = PrefetchLoader(slow_source(2, 0.0), device="cuda", depth=2)
    batch = next(loader)
    assert batch["x"].is_cuda and batch["index"] == 0
    loader.close()
