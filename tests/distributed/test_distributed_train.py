"""`mugen train dit --parallel` on 2 (and 4) gloo processes gives the single-process run's losses.

The reference is the single-process `mugen train dit` on a tiny manifest (global batch 3). The same
command on 2 processes, dp_shard=2 (rank 0 computes one sample of every batch, rank 1 two: an uneven
split), tp=2 (both ranks the whole batch, weights split), cp=2 (both ranks the whole batch, tokens
split) or dp_shard=2,tp=2 on 4 processes must log the same per-step losses (rtol 1e-5, as in
test_parallelize.py); a run stopped after 2 steps and resumed from its sharded checkpoint on the
same layout (or on tp=2) must continue with the same losses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from launcher import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from latent_data import build_latent_dataset  # noqa: E402

from mugen.cli import main  # noqa: E402

STEPS = 4
BATCH = 3
LOSS_RTOL = 1e-5
CONFIG = {
    # log_every=1: metrics.jsonl holds every step's loss; grad_clip low enough to clip (tests clip_grad_norm_);
    # 2 micro-batches per step (gradient accumulation under FSDP2), 3 batches per epoch (steps cross epochs)
    "train": {
        "lr": 1e-3, "log_every": 1, "checkpoint_every": 2, "prefetch": 0, "grad_clip": 0.5, "warmup_steps": 1, "grad_accum": 2,
    },
    "model": {"depth": 2},
}


def train_command(manifest: Path, config: Path, output: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train", "dit", "--manifest", str(manifest), "--output", str(output), "--config", str(config),
        "--steps", str(steps), "--batch-size", str(BATCH), "--seed", "3", *extra,
    ]


def train_on_rank(rank: int, world_size: int, argv: list[str]) -> int:
    return main(argv)


def logged(output: Path, name: str) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = {record["step"]: record[name] for record in records if name in record}
    return [values[step] for step in sorted(values)]


def logged_losses(output: Path) -> list[float]:
    return logged(output, "loss")


@pytest.fixture(scope="module")
def problem(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dtrain")
    manifest = build_latent_dataset(root / "data", videos=6, images=3)
    config = root / "config.json"
    config.write_text(json.dumps(CONFIG))
    reference = root / "single"
    assert main(train_command(manifest, config, reference, STEPS)) == 0
    losses = logged_losses(reference)
    assert len(losses) == STEPS
    return {"root": root, "manifest": manifest, "config": config, "losses": losses}


@pytest.mark.parametrize(
    "layout, world_size, rank0_samples", [("dp_shard=2", 2, 1), ("tp=2", 2, BATCH), ("cp=2", 2, BATCH), ("dp_shard=2,tp=2", 4, 1)]
)
def test_parallel_runs_give_single_process_losses(problem, layout, world_size, rank0_samples):
    output = problem["root"] / f"parallel_{layout.replace('=', '').replace(',', '_')}"
    argv = train_command(problem["manifest"], problem["config"], output, STEPS, "--parallel", layout)
    assert run_distributed(train_on_rank, world_size, args=(argv,)) == [0] * world_size
    assert logged_losses(output) == pytest.approx(problem["losses"], rel=LOSS_RTOL)
    # rank 0 logs the samples it computed in the step's micro-batches
    assert logged(output, "samples") == [rank0_samples * CONFIG["train"]["grad_accum"]] * STEPS
    checkpoints = output / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert (checkpoints / f"step_{STEPS:08d}" / ".metadata").is_file()  # sharded (DCP), not a single-file checkpoint
    assert json.loads((checkpoints / f"step_{STEPS:08d}" / "meta.json").read_text())["world_size"] == world_size
    assert (output / "loss_curve.png").is_file()


@pytest.mark.parametrize("resume_layout", ["dp_shard=2", "tp=2"])
def test_resume_continues_the_losses(problem, resume_layout):
    """Stopped after 2 steps on dp_shard=2, resumed on the same layout or on another one (DCP reshards)."""
    output = problem["root"] / f"resumed_{resume_layout.replace('=', '')}"
    first = train_command(problem["manifest"], problem["config"], output, 2, "--parallel", "dp_shard=2")
    assert run_distributed(train_on_rank, 2, args=(first,)) == [0, 0]
    assert logged_losses(output) == pytest.approx(problem["losses"][:2], rel=LOSS_RTOL)
    second = train_command(problem["manifest"], problem["config"], output, STEPS, "--parallel", resume_layout)
    assert run_distributed(train_on_rank, 2, args=(second,)) == [0, 0]
    assert logged_losses(output) == pytest.approx(problem["losses"], rel=LOSS_RTOL)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("dp_shard=two", "dp_shard='two' must be a whole number"),
        ("dp_shrd=2", "unknown key 'dp_shrd'"),
        ("dp_shard", "is not KEY=VALUE"),
        ("dp_shard=2,tp=2", "= 4 ranks, but the job has 1"),
    ],
)
def test_bad_parallel_layout_is_a_one_line_error(problem, layout, message, capsys):
    argv = train_command(problem["manifest"], problem["config"], problem["root"] / "bad", 1, "--parallel", layout)
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error
    assert len(error.splitlines()) == 1


def test_init_from_weights_are_broadcast_from_rank0(problem):
    """--init-from: rank 0 reads the trained reference run and broadcasts it; the losses are the single-process ones."""
    single, parallel = problem["root"] / "init_single", problem["root"] / "init_parallel"
    init = ("--init-from", str(problem["root"] / "single"))
    assert main(train_command(problem["manifest"], problem["config"], single, 2, *init)) == 0
    argv = train_command(problem["manifest"], problem["config"], parallel, 2, *init, "--parallel", "dp_shard=2")
    assert run_distributed(train_on_rank, 2, args=(argv,)) == [0, 0]
    assert logged_losses(parallel) == pytest.approx(logged_losses(single), rel=LOSS_RTOL)
    assert logged_losses(single)[0] != pytest.approx(problem["losses"][0], rel=1e-3)  # the weights did change the start


def test_config_section_parallel_is_read(problem, capsys):
    config = problem["root"] / "parallel_config.json"
    config.write_text(json.dumps({**CONFIG, "parallel": {"dp_shard": 2, "tp": 2}}))
    assert main(train_command(problem["manifest"], config, problem["root"] / "bad_config", 1)) == 2
    assert "= 4 ranks, but the job has 1" in capsys.readouterr().err
    config.write_text(json.dumps({**CONFIG, "parallel": {"dp_shard": 2, "zero": 3}}))
    assert main(train_command(problem["manifest"], config, problem["root"] / "bad_config", 1)) == 2
    assert "unknown keys ['zero']" in capsys.readouterr().err


def test_checkpoint_formats_are_not_mixed_up(problem, capsys):
    """A one-process run folder is not resumed by a parallel job, nor a sharded one by one process."""
    one_process = train_command(problem["manifest"], problem["config"], problem["root"] / "single", STEPS + 1, "--parallel", "dp_shard=2")
    assert run_distributed(train_on_rank, 2, args=(one_process,)) == [2, 2]
    sharded_run = problem["root"] / "sharded_run"
    (sharded_run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (sharded_run / "checkpoints" / "step_00000001" / ".metadata").write_bytes(b"")  # DCP's index file
    (sharded_run / "checkpoints" / "latest").write_text("step_00000001\n")
    assert main(train_command(problem["manifest"], problem["config"], sharded_run, STEPS + 1)) == 2
    assert "names a sharded checkpoint of a run on several processes" in capsys.readouterr().err
