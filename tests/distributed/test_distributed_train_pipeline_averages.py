"""`mugen train dit --parallel pp=...` with --ema-decay and --snapshot-every writes the single-process run's files.

The reference is the single-process run (global batch 4 of 8 videos and 4 images, 4 steps, lr 1e-4,
EMA decay 0.8 with warm-up, snapshots every 2 steps with the power EMAs sigma_rel 0.05 and 0.10, a
depth-2 model: one block per stage). Each pipeline rank averages its own stage's parameters
(``PipelineWeightAverages``); the snapshots and the EMA export gather every stage to rank 0. The
same command on pp=2 (2 processes, 2 pipeline micro-batches of 2 samples), pp=2 x dp_shard=2 (4
processes: FSDP shards inside each stage) and pp=2 x tp=2 (4 processes: tp slices, fused [q|k|v]
rows head-aligned inside each stage) must write the same ``ema/`` folder and
``snapshots/step_*`` files: same names, metadata, keys, shapes and dtypes, tensors within atol 1e-6
(fp32: the pipeline and FSDP sum gradients in another order than one process, and Adam turns that
into weight differences of a few thousandths of the learning rate; measured at most 3.9e-7, while the EMA differs from the
last weights by more than 1e-5). `mugen posthoc-ema` runs on the pipeline run's folder with the
single-process result (atol 1e-6). A pp=2 run stopped after 2 steps and resumed from its sharded
checkpoint (averages saved by stage) ends with exactly the files of the uninterrupted pp=2 run
(bitwise), and resumed on dp_shard=2 (a layout without stages) with the single-process files (atol 1e-6).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from launcher import run_distributed
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from latent_data import build_latent_dataset  # noqa: E402

from mugen.cli import main  # noqa: E402

STEPS = 4
BATCH = 4
ATOL, RTOL = 1e-6, 0.0  # fp32 reduction order only (pipeline micro-batches, FSDP sums): measured < 4e-7
CONFIG = {"train": {"lr": 1e-4, "log_every": 1, "checkpoint_every": 2, "prefetch": 0, "warmup_steps": 1}, "model": {"depth": 2}}
AVERAGING = ("--ema-decay", "0.8", "--snapshot-every", "2")
SNAPSHOT_STEPS = ["step_00000002", "step_00000004"]
SNAPSHOT_FILES = ["model.safetensors", "power_ema_0.0500.safetensors", "power_ema_0.1000.safetensors"]
PIPELINE = "pp=2,pp_microbatches=2"


def train_command(problem: dict, output: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train", "dit", "--manifest", str(problem["manifest"]), "--output", str(output), "--config", str(problem["config"]),
        "--steps", str(steps), "--batch-size", str(BATCH), "--seed", "5", *AVERAGING, *extra,
    ]


def train_on_rank(rank: int, world_size: int, argv: list[str]) -> int:
    return main(argv)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()


def weight_files() -> list[Path]:
    """The files a run writes for later use: the exported EMA and every snapshot file (relative paths)."""
    return [Path("ema/model.safetensors")] + [Path("snapshots") / step / name for step in SNAPSHOT_STEPS for name in SNAPSHOT_FILES]


def largest_difference(run: Path, reference: Path, exact: bool = False) -> float:
    """Check that ``run`` wrote ``reference``'s files (names, metadata, keys, values); returns the largest |difference|."""
    assert sorted(path.name for path in (run / "snapshots").iterdir()) == SNAPSHOT_STEPS
    for step in SNAPSHOT_STEPS:
        assert sorted(path.name for path in (run / "snapshots" / step).iterdir()) == SNAPSHOT_FILES
    largest = 0.0
    for relative in weight_files():
        mine, my_metadata = read_weights(run / relative)
        theirs, their_metadata = read_weights(reference / relative)
        assert my_metadata == their_metadata, relative
        assert mine.keys() == theirs.keys(), relative
        for name, tensor in theirs.items():
            assert mine[name].dtype == tensor.dtype and mine[name].shape == tensor.shape, f"{relative}: {name}"
            if exact:
                assert torch.equal(mine[name], tensor), f"{relative}: {name}"
            else:
                torch.testing.assert_close(mine[name], tensor, atol=ATOL, rtol=RTOL, msg=lambda m: f"{relative}: {name}: {m}")
            largest = max(largest, float((mine[name] - tensor).abs().max()))
    ema_record = json.loads((run / "ema" / "model_config.json").read_text())
    assert ema_record == json.loads((reference / "ema" / "model_config.json").read_text())
    assert ema_record["ema"] == {"decay": 0.8, "updates": STEPS}
    return largest


@pytest.fixture(scope="module")
def problem(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dtrain_pp_averages")
    problem = {"root": root, "manifest": build_latent_dataset(root / "data", videos=8, images=4), "config": root / "config.json"}
    problem["config"].write_text(json.dumps(CONFIG))
    assert main(train_command(problem, root / "single", STEPS)) == 0
    last = read_weights(root / "single" / "snapshots" / SNAPSHOT_STEPS[-1] / "model.safetensors")[0]
    ema = read_weights(root / "single" / "ema" / "model.safetensors")[0]
    assert max(float((ema[n] - last[n]).abs().max()) for n in ema) > 10 * ATOL  # the EMA is not the last weights
    return problem


@pytest.fixture(scope="module")
def pipeline_run(problem) -> Path:
    output = problem["root"] / "pp2"
    assert run_distributed(train_on_rank, 2, args=(train_command(problem, output, STEPS, "--parallel", PIPELINE),)) == [0, 0]
    return output


def test_pipeline_averages_match_single_process(problem, pipeline_run):
    largest = largest_difference(pipeline_run, problem["root"] / "single")
    print(f"pp=2: largest |difference| to the single-process files {largest:.2e}")
    meta = json.loads((pipeline_run / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())
    assert sorted(meta["extra"]) == ["ema", "power_ema_0.0500", "power_ema_0.1000"]  # saved with the stages
    assert meta["extra"]["ema"]["updates"] == STEPS


@pytest.mark.parametrize("layout", ["pp=2,dp_shard=2,pp_microbatches=2", "pp=2,tp=2,pp_microbatches=2"])
def test_pipeline_with_sharded_stages_averages_match_single_process(problem, layout):
    """Each stage's averages are FSDP shards / tp slices: gathered inside the stage (fused rows back in
    [q|k|v] order), then sent to rank 0."""
    output = problem["root"] / layout.split(",pp_")[0].replace("=", "").replace(",", "_")
    assert run_distributed(train_on_rank, 4, args=(train_command(problem, output, STEPS, "--parallel", layout),)) == [0] * 4
    largest = largest_difference(output, problem["root"] / "single")
    print(f"{layout}: largest |difference| to the single-process files {largest:.2e}")


def test_posthoc_ema_runs_on_the_pipeline_snapshots(problem, pipeline_run):
    results = {}
    for name, run in (("single", problem["root"] / "single"), ("pipeline", pipeline_run)):
        output = problem["root"] / f"posthoc_{name}"
        assert main(["posthoc-ema", "--run", str(run), "--method", "power", "--sigma-rel", "0.07", "--output", str(output)]) == 0
        results[name] = read_weights(output / "model.safetensors")[0]
    assert results["pipeline"].keys() == results["single"].keys()
    for name, tensor in results["single"].items():
        torch.testing.assert_close(results["pipeline"][name], tensor, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("resume_layout", [PIPELINE, "dp_shard=2"])
def test_resumed_pipeline_run_continues_the_averages(problem, pipeline_run, resume_layout):
    """Steps 1-2 on pp=2, a new job from the sharded checkpoint, steps 3-4 on pp=2 (bitwise the straight pp=2
    run's files) or on dp_shard=2 (no stages: the averages saved by stage load into FSDP shards)."""
    output = problem["root"] / f"pp2_resumed_{resume_layout.split(',')[0].replace('=', '')}"
    for steps, layout in ((2, PIPELINE), (STEPS, resume_layout)):
        assert run_distributed(train_on_rank, 2, args=(train_command(problem, output, steps, "--parallel", layout),)) == [0, 0]
        if steps == 2:
            assert (output / "ema" / "model.safetensors").is_file()  # exported after the first job too
    if resume_layout == PIPELINE:
        largest_difference(output, pipeline_run, exact=True)
    else:
        largest_difference(output, problem["root"] / "single")
