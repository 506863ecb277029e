"""Curriculum runs of `mugen train dit` (seed §4.2.2) on 2 gloo processes give the single-process run.

The reference is the single-process curriculum run of three stages over two manifests (images,
videos): stage 1 anneals the image share 1 -> 0 and ends after 2 steps (a step count transition),
stage 2 ends on a validation plateau (patience 1 and a min_delta no loss can beat: the second report
of the stage ends it, after step 4), stage 3 masks the first frame. The same config on dp_shard=2
(each rank one sample of every batch), tp=2 (both ranks the whole batch, weights split) and cp=2
(both ranks the whole batch, tokens split; the validation forwards too) must log the same per-step
losses (rtol 1e-5, as in test_distributed_train.py), the same stage at every step, the same
validation losses (rtol 1e-5) and the same plateau decisions. A run stopped after
step 3 (mid stage 2: the plateau tracking has one report) on dp_shard=2 and resumed on tp=2 must
continue with the uninterrupted run's losses and stages; with --ema-decay as well (the EMA saved as
shards beside the weights, the curriculum state in the same checkpoint's training state), the
exported EMA is the single-process run's within fp32 reduction-order noise (atol 2e-5, rtol 1e-4,
as in test_distributed_train_averages.py).

On pipeline stages (the model has two blocks: one per stage) pp=2 (2 pipeline micro-batches of one
sample) and pp=2 x dp_shard=2 (GPipe, one sample per share) log the same losses, stages, validation
losses and plateau decisions (the held-out loss runs through the stages); a run stopped after step 3
on pp=2 resumes on dp_shard=2 and the reverse, and with --ema-decay a pp=2 run resumed on dp_shard=2
exports the single-process EMA (same tolerances).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from launcher import run_distributed
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from latent_data import build_latent_dataset  # noqa: E402

from mugen.cli import main  # noqa: E402

STEPS = 6
BATCH = 2
LOSS_RTOL = 1e-5
EMA_ATOL, EMA_RTOL = 2e-5, 1e-4  # fp32: FSDP/TP sum in another order than one process
STAGES_OF_STEPS = [0, 0, 1, 1, 2, 2]  # stage 1 ends at its max_steps (2), stage 2 on the plateau found after step 4
PIPELINE = "pp=2,pp_microbatches=2"  # one block per stage; each batch of 2 runs as 2 pipeline micro-batches of 1


def curriculum_config(manifests: dict) -> dict:
    return {
        # log_every=1: metrics.jsonl holds every step; a constant lr, so a run stopped early and resumed
        # with more --steps has the schedule of the uninterrupted run; 2 micro-batches per step; 5 batches
        # per epoch (the sampler's epoch turns mid-run and at the resume point)
        "train": {"lr": 1e-3, "log_every": 1, "checkpoint_every": 0, "prefetch": 0, "grad_clip": 0.5, "decay": "constant", "grad_accum": 2},
        "model": {"depth": 2},  # two blocks: one per pipeline stage on pp=2
        "curriculum": {
            "validation_manifest": manifests["held_out"],
            "validation_every": 2,
            "validation_levels": 2,
            "batches_per_epoch": 5,
            "stages": [
                {
                    "name": "images_and_videos",
                    "manifests": {manifests["images"]: 1.0, manifests["videos"]: 1.0},
                    "image_manifests": [manifests["images"]],
                    "image_ratio_start": 1.0,
                    "image_ratio_end": 0.0,
                    "max_steps": 2,
                },
                {"name": "videos_until_plateau", "manifests": {manifests["videos"]: 1.0}, "plateau_patience": 1, "plateau_min_delta": 100.0},
                {"name": "videos_masked", "manifests": {manifests["videos"]: 1.0}, "first_frame_cond_prob": 1.0},
            ],
        },
    }


def train_command(config: Path, output: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "dit", "--config", str(config), "--output", str(output), "--steps", str(steps), "--batch-size", str(BATCH), "--seed", "5", *extra]


def train_on_rank(rank: int, world_size: int, argv: list[str]) -> int:
    return main(argv)


def logged(output: Path, name: str) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = {record["step"]: record[name] for record in records if name in record}
    return [values[step] for step in sorted(values)]


def validation_log(output: Path) -> list[dict]:
    return json.loads((output / "curriculum.json").read_text())["validation"]


@pytest.fixture(scope="module")
def problem(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dcurriculum")
    manifests = {
        "images": str(build_latent_dataset(root / "images", videos=0, images=4, seed=1)),
        "videos": str(build_latent_dataset(root / "videos", videos=4, images=0, seed=2)),
        "held_out": str(build_latent_dataset(root / "held_out", videos=2, images=0, seed=3)),
    }
    config = root / "config.json"
    config.write_text(json.dumps(curriculum_config(manifests)))
    reference = root / "single"
    assert main(train_command(config, reference, STEPS)) == 0
    assert [int(stage) for stage in logged(reference, "curriculum_stage")] == STAGES_OF_STEPS
    assert [entry["plateau_transition"] for entry in validation_log(reference)] == [False, True, False]
    return {"root": root, "config": config, "reference": reference, "losses": logged(reference, "loss")}


def assert_same_run(output: Path, reference: Path) -> None:
    """Per-step losses (rtol 1e-5), stages, image ratios and validation losses / plateau decisions of the reference run."""
    assert logged(output, "loss") == pytest.approx(logged(reference, "loss"), rel=LOSS_RTOL)
    assert logged(output, "curriculum_stage") == logged(reference, "curriculum_stage")
    assert logged(output, "image_ratio") == logged(reference, "image_ratio")
    assert logged(output, "first_frame_cond_prob") == logged(reference, "first_frame_cond_prob")
    ours, theirs = validation_log(output), validation_log(reference)
    assert [(v["step"], v["stage"], v["plateau_transition"]) for v in ours] == [(v["step"], v["stage"], v["plateau_transition"]) for v in theirs]
    assert [v["validation_loss"] for v in ours] == pytest.approx([v["validation_loss"] for v in theirs], rel=LOSS_RTOL)


@pytest.mark.parametrize("layout, rank0_samples", [("dp_shard=2", 1), ("tp=2", BATCH), ("cp=2", BATCH)])
def test_parallel_curriculum_gives_single_process_losses_and_transitions(problem, layout, rank0_samples):
    output = problem["root"] / f"parallel_{layout.replace('=', '')}"
    argv = train_command(problem["config"], output, STEPS, "--parallel", layout)
    assert run_distributed(train_on_rank, 2, args=(argv,)) == [0, 0]
    assert_same_run(output, problem["reference"])
    # rank 0 logs the samples it computed in the step's micro-batches: its data-parallel share
    assert logged(output, "samples") == [rank0_samples * 2] * STEPS
    final = output / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / ".metadata").is_file()  # sharded (DCP)
    saved = json.loads((output / "curriculum.json").read_text())["schedule"]
    assert (saved["stage_index"], saved["total_steps"]) == (2, STEPS)
    assert (output / "curriculum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curriculum_stopped_mid_stage_resumes_on_another_layout(problem):
    """Saved after step 3 on dp_shard=2 (stage 2, one validation report), resumed on tp=2 (DCP reshards)."""
    output = problem["root"] / "resumed"
    first = train_command(problem["config"], output, 3, "--parallel", "dp_shard=2")
    assert run_distributed(train_on_rank, 2, args=(first,)) == [0, 0]
    assert logged(output, "loss") == pytest.approx(problem["losses"][:3], rel=LOSS_RTOL)
    saved = json.loads((output / "curriculum.json").read_text())["schedule"]
    # mid stage 2 with its first validation loss as the best so far: the plateau after step 4 needs it
    assert (saved["stage_index"], saved["step_in_stage"], saved["reports_without_improvement"]) == (1, 1, 0)
    assert saved["best_loss"] is not None
    second = train_command(problem["config"], output, STEPS, "--parallel", "tp=2")
    assert run_distributed(train_on_rank, 2, args=(second,)) == [0, 0]
    assert_same_run(output, problem["reference"])


@pytest.mark.parametrize("first_layout, second_layout", [("dp_shard=2", "tp=2"), (PIPELINE, "dp_shard=2")])
def test_curriculum_with_ema_resumes_on_another_layout(problem, first_layout, second_layout):
    """--ema-decay: EMA shards and the curriculum state share the checkpoint; stopped on one layout, resumed on another.

    On pp=2 each stage's EMA shards are saved with the stage (``PipelineWeightAverages``).
    """
    ema = ("--ema-decay", "0.8")
    reference = problem["root"] / "single_ema"
    if not (reference / "ema" / "model.safetensors").is_file():  # one reference for both layouts
        assert main(train_command(problem["config"], reference, STEPS, *ema)) == 0
    output = problem["root"] / f"resumed_ema_{first_layout.split(',')[0].replace('=', '')}"
    first = train_command(problem["config"], output, 3, *ema, "--parallel", first_layout)
    assert run_distributed(train_on_rank, 2, args=(first,)) == [0, 0]
    second = train_command(problem["config"], output, STEPS, *ema, "--parallel", second_layout)
    assert run_distributed(train_on_rank, 2, args=(second,)) == [0, 0]
    assert_same_run(output, reference)
    mine, theirs = load_file(output / "ema" / "model.safetensors"), load_file(reference / "ema" / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(mine[name], tensor, atol=EMA_ATOL, rtol=EMA_RTOL, msg=lambda m: f"{name}: {m}")
    assert json.loads((output / "ema" / "model_config.json").read_text())["ema"] == {"decay": 0.8, "updates": STEPS}


@pytest.mark.parametrize(
    "layout, world_size, rank0_samples",
    [(PIPELINE, 2, BATCH), ("pp=2,dp_shard=2,pp_schedule=GPipe", 4, 1)],  # x dp_shard: shares of 1, one pipeline micro-batch
)
def test_curriculum_on_pipeline_stages_gives_single_process_losses_and_transitions(problem, layout, world_size, rank0_samples):
    """The steps and the held-out losses run through the stages (stage 3's first-frame masks too)."""
    output = problem["root"] / f"pipeline_{world_size}"
    argv = train_command(problem["config"], output, STEPS, "--parallel", layout)
    assert run_distributed(train_on_rank, world_size, args=(argv,)) == [0] * world_size
    assert_same_run(output, problem["reference"])
    assert logged(output, "samples") == [rank0_samples * 2] * STEPS  # rank 0's data-parallel share of 2 micro-batches
    assert (output / "checkpoints" / f"step_{STEPS:08d}" / ".metadata").is_file()
    saved = json.loads((output / "curriculum.json").read_text())["schedule"]
    assert (saved["stage_index"], saved["total_steps"]) == (2, STEPS)


@pytest.mark.parametrize("first_layout, second_layout", [(PIPELINE, "dp_shard=2"), ("dp_shard=2", PIPELINE)])
def test_curriculum_resumes_between_pipeline_stages_and_data_parallel(problem, first_layout, second_layout):
    """Stopped after step 3 (mid stage 2, one plateau report) on one layout, resumed on the other."""
    output = problem["root"] / f"resumed_{first_layout.split(',')[0].replace('=', '')}"
    first = train_command(problem["config"], output, 3, "--parallel", first_layout)
    assert run_distributed(train_on_rank, 2, args=(first,)) == [0, 0]
    assert logged(output, "loss") == pytest.approx(problem["losses"][:3], rel=LOSS_RTOL)
    saved = json.loads((output / "curriculum.json").read_text())["schedule"]
    assert (saved["stage_index"], saved["step_in_stage"], saved["reports_without_improvement"]) == (1, 1, 0)
    second = train_command(problem["config"], output, STEPS, "--parallel", second_layout)
    assert run_distributed(train_on_rank, 2, args=(second,)) == [0, 0]
    assert_same_run(output, problem["reference"])
