"""How `train_dit`'s options reach the run on several processes, checked before any process group or model is made."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mugen.errors import MugenError
from mugen.train import distributed_run
from mugen.train.distributed_run import parallel_run_for


def _spec(**changes):
    spec = SimpleNamespace(
        parallel={"pp": 2, "pp_microbatches": 2},
        device="cpu",
        batch_size=4,
        image_batch_size=None,
        balanced=False,
        ema_decay=None,
        snapshot_every=0,
        train=SimpleNamespace(mixed_precision="fp32", grad_accum=1),
    )
    for name, value in changes.items():
        setattr(spec, name, value)
    return spec


@pytest.fixture
def no_mesh(monkeypatch) -> list[dict]:
    """Two processes; ``ParallelRun.__init__`` records its arguments instead of building a mesh."""
    calls: list[dict] = []

    def record(self, config, device, micro_batches=1):
        calls.append({"config": config, "device": device, "micro_batches": micro_batches})

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed_run.ParallelRun, "__init__", record)
    return calls


@pytest.mark.parametrize(
    "changes",
    [
        {"balanced": True, "batch_size": 3},  # balanced shares of any size: padded to the pipeline micro-batches
        {"ema_decay": 0.999},
        {"snapshot_every": 10},
        {"balanced": True, "ema_decay": 0.999, "snapshot_every": 10, "train": SimpleNamespace(mixed_precision="fp32", grad_accum=3)},
    ],
)
def test_pipeline_stages_take_balanced_batches_and_weight_averages(no_mesh, changes):
    from mugen.train.pipeline_run import PipelineRun

    spec = _spec(**changes)
    run = parallel_run_for(spec)
    assert isinstance(run, PipelineRun)
    (call,) = no_mesh
    assert call["config"].pp == 2
    assert call["micro_batches"] == spec.train.grad_accum  # the balanced split's step boundary


def test_pipeline_stages_without_balanced_batches_still_check_the_batch_size(no_mesh):
    with pytest.raises(MugenError, match=r"batch size 3 gives data-parallel shares of \[3\] samples"):
        parallel_run_for(_spec(batch_size=3, ema_decay=0.999))
    assert not no_mesh


def test_one_process_is_the_single_process_run(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parallel_run_for(_spec(parallel=None, ema_decay=0.999, balanced=True)) is None
