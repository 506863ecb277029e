"""Background prefetching of training batches, with the time spent waiting for them (seed §5.2).

Seed §5.2: "an asynchronous I/O pipeline with aggressive pre-fetching ..., overlapping data
preprocessing and transfer with computation to hide latency". ``PrefetchLoader`` pulls batches from
any iterator (typically a ``DataLoader``, whose workers read and collate) on a background thread,
``depth`` batches ahead of training. On CUDA each batch is pinned and copied to the GPU
asynchronously on a side stream; the training stream waits for that copy on the GPU, not on the
CPU. Every ``next()`` measures how long the training loop was blocked waiting
(``last_wait_s``, ``total_wait_s``): the Trainer logs it as a fraction of the step time (goal < 2%).

Errors raised while producing a batch reach the training loop at the ``next()`` that would have
returned it, with their original type and traceback; ``close()`` stops the thread and closes
the source. ``depth=0`` produces batches synchronously in the caller's thread (same interface and
measurement: then the wait is the whole load time).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from mugen.errors import MugenError

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def pin_batch(value: Any) -> Any:
    """Page-lock the CPU tensors of a nested batch (dict/list/tuple), so copies to the GPU can be async."""
    if isinstance(value, Tensor):
        return value if value.device.type != "cpu" or value.is_pinned() else value.pin_memory()
    if isinstance(value, dict):
        return {key: pin_batch(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        moved = [pin_batch(item) for item in value]
        return moved if isinstance(value, list) else tuple(moved)
    return value


def move_to_device(value: Any, device: torch.device) -> Any:
    """Move tensors in nested dicts/lists/tuples to ``device`` (non-blocking on CUDA); leave the rest as is."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=device.type == "cuda")
    if isinstance(value, dict):
        return {key: move_to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        moved = [move_to_device(item, device) for item in value]
        return moved if isinstance(value, list) else tuple(moved)
    return value


def _record_stream(value: Any, stream) -> None:
    """Tell the caching allocator that tensors made on the copy stream are used on ``stream``."""
    if isinstance(value, Tensor):
        if value.device.type == "cuda":
            value.record_stream(stream)
    elif isinstance(value, dict):
        for item in value.values():
            _record_stream(item, stream)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _record_stream(item, stream)


class PrefetchLoader:
    """Iterate ``source`` ahead of the consumer on a thread; batches arrive on ``device``."""

    def __init__(self, source: Iterable, device="cpu", depth: int = 2, pin_memory: bool | None = None):
        if depth < 0:
            raise MugenError(f"PrefetchLoader: depth={depth} must be >= 0 (0 loads in the training thread)")
        self.device = torch.device(device)
        self.depth = int(depth)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self.total_wait_s = 0.0
        self.last_wait_s = 0.0
        self.batches = 0
        self._source: Iterator = iter(source)  # created here: DataLoader workers start from the main thread
        self._closed = False
        self._stop = threading.Event()
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread: threading.Thread | None = None
        if self.depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._produce, name="mugen-prefetch", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------- producer
    def _prepare(self, batch: Any) -> tuple[Any, Any]:
        if self.pin_memory:
            batch = pin_batch(batch)
        if self._copy_stream is None:
            return move_to_device(batch, self.device), None
        with torch.cuda.stream(self._copy_stream):
            batch = move_to_device(batch, self.device)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return batch, event

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for batch in self._source:
                if self._stop.is_set() or not self._put(self._prepare(batch)):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._put(_Failure(error))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # a half-run generator may refuse; the thread ends either way
                    pass

    # ------------------------------------------------------------------------------- consumer
    def __iter__(self) -> "PrefetchLoader":
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        start = time.perf_counter()
        if self._thread is None:
            try:
                item = self._prepare(next(self._source))
            except StopIteration:
                item = _END
        else:
            item = self._queue.get()
        self.last_wait_s = time.perf_counter() - start
        self.total_wait_s += self.last_wait_s
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        batch, event = item
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)  # the GPU waits for the copy; the CPU goes on
            _record_stream(batch, stream)
        self.batches += 1
        return batch

    def close(self, timeout: float = 30.0) -> None:
        """Stop the producer thread (dropping prefetched batches) and close the source.

        A producer stuck inside the source for longer than ``timeout`` seconds is left behind (it
        is a daemon thread and stops at its next batch).
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            deadline = time.perf_counter() + timeout
            while self._thread.is_alive() and time.perf_counter() < deadline:
                try:  # unblock a producer waiting on a full queue
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
        else:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> "PrefetchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
