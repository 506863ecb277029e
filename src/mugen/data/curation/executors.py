"""Where per-video curation work runs: in this process, a local process pool, or a Ray cluster.

Every executor has one method, `map_unordered(function, items)`, yielding `(item, outcome)` as
items finish, in any order, where `outcome` is the function's return value or the exception it
raised (a crashed worker is reported the same way, never raised), so the caller can record one
failed video and go on. At most `max_in_flight` items are submitted at a time: memory stays bounded
however many videos there are, and a killed run loses at most that many videos' work.

- `InlineExecutor` (`--workers 1`): no pool, easiest to debug.
- `ProcessExecutor` (`--workers N`): `concurrent.futures.ProcessPoolExecutor`, spawn start method
  (forking a process that holds torch/OpenMP threads can deadlock). A worker that dies (e.g. a
  segfault in a decoder) breaks the pool: the executor reports the items it had in flight as
  failed and starts a fresh pool for the rest.
- `RayExecutor` (`--executor ray`): `ray.remote` tasks, one CPU each, on the cluster at
  `--ray-address` (or the instance this process already joined, or a new local one). Workers write
  clip files themselves, so on a multi-node cluster `--output` must be a shared file system.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from mugen.errors import MugenError

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    name: str

    def map_unordered(self, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[tuple[Any, Any]]: ...

    def close(self) -> None: ...


class InlineExecutor:
    name = "inline"

    def map_unordered(self, function, items):
        for item in items:
            try:
                outcome = function(item)
            except Exception as error:  # noqa: BLE001 - reported to the caller, which records it
                outcome = error
            yield item, outcome

    def close(self) -> None:
        pass


class ProcessExecutor:
    name = "process"

    def __init__(self, workers: int, max_in_flight: int | None = None):
        if workers < 1:
            raise MugenError(f"--workers {workers} must be at least 1")
        self.workers = workers
        self.max_in_flight = max_in_flight or 2 * workers
        self._pool: futures.ProcessPoolExecutor | None = None

    def _new_pool(self) -> futures.ProcessPoolExecutor:
        return futures.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def map_unordered(self, function, items):
        pending = iter(items)
        in_flight: dict[futures.Future, Any] = {}
        self._pool = self._pool or self._new_pool()
        while True:
            _top_up(in_flight, pending, lambda item: self._pool.submit(function, item), self.max_in_flight)
            if not in_flight:
                return
            done, _ = futures.wait(in_flight, return_when=futures.FIRST_COMPLETED)
            broken = False
            for future in done:
                item = in_flight.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool as error:
                    broken, outcome = True, error
                except Exception as error:  # noqa: BLE001 - reported to the caller
                    outcome = error
                yield item, outcome
            if broken:  # every future of a broken pool fails; report them and start afresh
                for future, item in list(in_flight.items()):
                    yield item, BrokenProcessPool("a worker process died while this video was in flight")
                in_flight.clear()
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                logger.warning("a curation worker process died; started a new pool")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_in_flight: int | None = None):
        try:
            import ray
        except ImportError:
            raise MugenError("--executor ray needs the `ray` package; install it with `pip install ray`") from None
        self.ray = ray
        if not ray.is_initialized():
            # Workers must import mugen the way this process does (a source checkout included).
            runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(_import_paths())}}
            if address:
                ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
            self._started = True
        else:
            self._started = False
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        self.max_in_flight = max_in_flight or 2 * max(1, cluster_cpus)

    def map_unordered(self, function, items):
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=0)(function)
        pending = iter(items)
        in_flight: dict[Any, Any] = {}
        while True:
            _top_up(in_flight, pending, remote.remote, self.max_in_flight)
            if not in_flight:
                return
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for reference in done:
                item = in_flight.pop(reference)
                try:
                    outcome = ray.get(reference)
                except Exception as error:  # noqa: BLE001 - a task error or a dead worker
                    outcome = error
                yield item, outcome

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


_END = object()


def _top_up(in_flight: dict, pending: Iterator, submit: Callable[[Any], Any], limit: int) -> None:
    """Submit items from `pending` until `limit` are in flight ({handle: item}) or none are left."""
    while len(in_flight) < limit:
        item = next(pending, _END)
        if item is _END:
            return
        in_flight[submit(item)] = item


def _import_paths() -> list[str]:
    import mugen

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(mugen.__file__)))
    existing = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    return [package_root] + [path for path in existing if path != package_root]


def make_executor(kind: str = "local", workers: int = 1, ray_address: str | None = None) -> Executor:
    if kind not in EXECUTORS:
        raise MugenError(f"--executor {kind!r} is unknown; use one of {EXECUTORS}")
    if kind == "ray":
        return RayExecutor(address=ray_address, num_cpus=None if ray_address else workers)
    if workers < 1:
        raise MugenError(f"--workers {workers} must be at least 1")
    return InlineExecutor() if workers == 1 else ProcessExecutor(workers)
