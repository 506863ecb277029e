"""Options that several processes do not take yet fail before any process group or model is made."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mugen.errors import MugenError
from mugen.train.distributed_run import parallel_run_for


def _spec(**changes):
    spec = SimpleNamespace(
        parallel={"pp": 2},
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


@pytest.mark.parametrize(
    "changes, flag",
    [({"balanced": True}, "--balanced"), ({"ema_decay": 0.999}, "--ema-decay"), ({"snapshot_every": 10}, "--snapshot-every")],
)
def test_pipeline_stages_refuse_the_options_they_do_not_take(monkeypatch, changes, flag):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MugenError, match=f"{flag}.*pipeline stages.*pp=2"):
        parallel_run_for(_spec(**changes))


def test_one_process_is_the_single_process_run(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parallel_run_for(_spec(parallel=None, ema_decay=0.999, balanced=True)) is None
