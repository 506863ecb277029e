"""Run a function on N gloo processes on the CPU, the way torchrun would on N GPUs.

Used by every test under ``tests/distributed/``::

    def body(rank: int, world_size: int, scale: float) -> float:   # module level, so it pickles
        value = torch.tensor([rank * scale])
        dist.all_reduce(value)
        return float(value)

    results = run_distributed(body, world_size=2, args=(1.5,))    # [1.5, 1.5], one per rank

Each rank is a fresh process (forked from a ``forkserver`` that only imported torch: no state leaks
in from the pytest process) with the
default process group already initialised on gloo, ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
``MASTER_ADDR`` / ``MASTER_PORT`` set as torchrun sets them (so ``init_device_mesh`` works), and one
intra-op thread (the CI machine has two cores shared by all ranks). Rendezvous goes through a
``FileStore`` in a private temporary directory, so parallel test workers never race for a port; the
port in ``MASTER_PORT`` is a free one for code that reads it.

What each rank returns comes back to the caller as a list ordered by rank (it must pickle; return
CPU tensors or plain values). If any rank raises, every rank is stopped and the caller gets a
``DistributedTestFailure`` holding that rank's traceback. A run that exceeds ``timeout`` seconds (a
hang in a collective) is killed and raises ``TimeoutError``.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 180.0
# Ranks fork from a server process that imported these once (the pytest process starts it on the
# first run): a rank then starts in well under a second instead of importing torch afresh.
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp"]
mp.get_context("forkserver").set_forkserver_preload(_PRELOAD)


class DistributedTestFailure(RuntimeError):
    """A rank raised; the message holds its traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    args: tuple,
    workdir: str,
    port: int,
    threads: int,
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # Gloo picks the interface of the host name, which may not route in a sandbox; loopback always does.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    result_path = Path(workdir) / f"result_{rank}.pkl"
    store = dist.FileStore(str(Path(workdir) / "rendezvous"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        with open(result_path, "wb") as handle:
            pickle.dump(result, handle)
    except BaseException:
        # Record the traceback with its time: when one rank fails, its peers fail next in their
        # collectives ("connection closed"), and the caller wants the first failure.
        (Path(workdir) / f"error_{rank}.txt").write_text(f"{time.time():.6f}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def _failure_report(workdir: Path, world_size: int, fallback: str) -> str:
    """Tracebacks of the ranks that failed, the first failure first."""
    failures = []
    for rank in range(world_size):
        path = workdir / f"error_{rank}.txt"
        if path.is_file():
            stamp, _, text = path.read_text().partition("\n")
            failures.append((float(stamp), rank, text))
    if not failures:
        return fallback
    failures.sort()
    return "\n".join(
        f"rank {rank} of {world_size} failed{' first' if index == 0 else ''}:\n{text}"
        for index, (_, rank, text) in enumerate(failures)
    )


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout: float = DEFAULT_TIMEOUT_S,
    threads_per_rank: int = 1,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return the results by rank.

    ``fn`` must be a module-level function (spawned processes import it by name).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1")
    with tempfile.TemporaryDirectory(prefix="mugen-dist-") as workdir:
        context = mp.start_processes(
            _rank_entry,
            args=(fn, world_size, args, workdir, free_port(), threads_per_rank),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{getattr(fn, '__name__', fn)} on {world_size} processes did not finish in {timeout:.0f} s "
                        "(a collective that some rank never reached?)"
                    )
        except mp.ProcessRaisedException as error:
            raise DistributedTestFailure(_failure_report(Path(workdir), world_size, str(error))) from None
        except mp.ProcessExitedException as error:
            raise DistributedTestFailure(_failure_report(Path(workdir), world_size, f"a rank died: {error}")) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            for process in context.processes:
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
        results = []
        for rank in range(world_size):
            with open(Path(workdir) / f"result_{rank}.pkl", "rb") as handle:
                results.append(pickle.load(handle))
        return results
