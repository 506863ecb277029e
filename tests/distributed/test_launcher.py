"""The gloo launcher that every distributed test stands on: results, failures and hangs."""

import time

import pytest
import torch
import torch.distributed as dist
from launcher import DistributedTestFailure, run_distributed


def _sum_ranks(rank: int, world_size: int, scale: float) -> tuple[int, float]:
    value = torch.tensor([float(rank) * scale])
    dist.all_reduce(value)
    return dist.get_rank(), float(value)


def _rank_one_fails(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # rank 0 waits here for a rank that never comes: the launcher must stop it


def _rank_one_hangs(rank: int, world_size: int) -> None:
    if rank == 0:
        dist.barrier()  # waits for rank 1, which sleeps without leaving the group
    else:
        time.sleep(120)


def test_results_come_back_by_rank():
    results = run_distributed(_sum_ranks, world_size=3, args=(1.5,))
    assert results == [(0, 4.5), (1, 4.5), (2, 4.5)]


def test_a_failing_rank_fails_the_run_with_its_traceback():
    with pytest.raises(DistributedTestFailure, match="rank 1 of 2 failed first:(.|\n)*deliberate failure on rank one"):
        run_distributed(_rank_one_fails, world_size=2, timeout=60)


def test_a_hang_times_out():
    with pytest.raises(TimeoutError, match="did not finish"):
        run_distributed(_rank_one_hangs, world_size=2, timeout=3)
