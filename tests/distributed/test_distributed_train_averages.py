"""`mugen train dit --parallel` with --ema-decay and --snapshot-every gives the single-process run's files.

The reference is the single-process run (global batch 2, 4 steps, EMA decay 0.8 with warm-up,
snapshots every 2 steps with the default power EMAs sigma_rel 0.05 and 0.10). The same command on
2 gloo processes, dp_shard=2 (FSDP: EMA shards beside the parameter shards) or tp=2 (fused [q|k|v]
rows head-aligned), must write the same ``ema/`` folder and the same ``snapshots/step_*`` files:
same names, same metadata, tensors within fp32 reduction-order noise (atol 2e-5, rtol 1e-4, as in
test_sharded_ema.py). A dp_shard=2 run stopped after 2 steps and resumed from its sharded
checkpoint ends with exactly the EMA and snapshots of the uninterrupted dp_shard=2 run (bitwise),
and `mugen posthoc-ema` runs on the parallel run's folder and gives the single-process result.
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
BATCH = 2
ATOL, RTOL = 2e-5, 1e-4  # fp32: FSDP/TP sum in another order than one process
CONFIG = {"train": {"lr": 1e-3, "log_every": 1, "checkpoint_every": 2, "prefetch": 0, "warmup_steps": 1}, "model": {"depth": 2}}
AVERAGING = ("--ema-decay", "0.8", "--snapshot-every", "2")
SNAPSHOT_STEPS = ["step_00000002", "step_00000004"]
SNAPSHOT_FILES = ["model.safetensors", "power_ema_0.0500.safetensors", "power_ema_0.1000.safetensors"]


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


def weight_files(run: Path) -> list[Path]:
    """The files a run writes for later use: the exported EMA and every snapshot file (relative paths)."""
    return [Path("ema/model.safetensors")] + [Path("snapshots") / step / name for step in SNAPSHOT_STEPS for name in SNAPSHOT_FILES]


def assert_same_files(run: Path, reference: Path, exact: bool = False) -> None:
    assert sorted(path.name for path in (run / "snapshots").iterdir()) == SNAPSHOT_STEPS
    for step in SNAPSHOT_STEPS:
        assert sorted(path.name for path in (run / "snapshots" / step).iterdir()) == SNAPSHOT_FILES
    for relative in weight_files(reference):
        mine, my_metadata = read_weights(run / relative)
        theirs, their_metadata = read_weights(reference / relative)
        assert my_metadata == their_metadata, relative
        assert mine.keys() == theirs.keys(), relative
        for name, tensor in theirs.items():
            if exact:
                assert torch.equal(mine[name], tensor), f"{relative}: {name}"
            else:
                torch.testing.assert_close(mine[name], tensor, atol=ATOL, rtol=RTOL, msg=lambda m: f"{relative}: {name}: {m}")
    ema_record = json.loads((run / "ema" / "model_config.json").read_text())
    assert ema_record == json.loads((reference / "ema" / "model_config.json").read_text())
    assert ema_record["ema"] == {"decay": 0.8, "updates": STEPS}


@pytest.fixture(scope="module")
def problem(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dtrain_averages")
    problem = {"root": root, "manifest": build_latent_dataset(root / "data", videos=4, images=2), "config": root / "config.json"}
    problem["config"].write_text(json.dumps(CONFIG))
    assert main(train_command(problem, root / "single", STEPS)) == 0
    start = read_weights(root / "single" / "snapshots" / SNAPSHOT_STEPS[0] / "model.safetensors")[0]
    ema = read_weights(root / "single" / "ema" / "model.safetensors")[0]
    assert max(float((ema[n] - start[n]).abs().max()) for n in ema) > 1e-4  # the EMA is not the step-2 weights
    return problem


@pytest.fixture(scope="module")
def dp_shard_run(problem) -> Path:
    output = problem["root"] / "dp_shard2"
    assert run_distributed(train_on_rank, 2, args=(train_command(problem, output, STEPS, "--parallel", "dp_shard=2"),)) == [0, 0]
    return output


def test_dp_shard_averages_match_single_process(problem, dp_shard_run):
    assert_same_files(dp_shard_run, problem["root"] / "single")
    meta = json.loads((dp_shard_run / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())
    assert meta["extra"]["ema"]["updates"] == STEPS  # the averages are in the sharded checkpoint
    assert sorted(meta["extra"]) == ["ema", "power_ema_0.0500", "power_ema_0.1000"]


def test_tp_averages_match_single_process(problem):
    output = problem["root"] / "tp2"
    assert run_distributed(train_on_rank, 2, args=(train_command(problem, output, STEPS, "--parallel", "tp=2"),)) == [0, 0]
    assert_same_files(output, problem["root"] / "single")


def test_resumed_run_continues_the_averages_exactly(problem, dp_shard_run):
    """Steps 1-2, a new job from the sharded checkpoint, steps 3-4: the files of the straight run, bitwise."""
    output = problem["root"] / "dp_shard2_resumed"
    for steps in (2, STEPS):
        argv = train_command(problem, output, steps, "--parallel", "dp_shard=2")
        assert run_distributed(train_on_rank, 2, args=(argv,)) == [0, 0]
        if steps == 2:
            assert read_weights(output / "ema" / "model.safetensors")[0].keys()  # exported after the first job too
    assert_same_files(output, dp_shard_run, exact=True)


@pytest.mark.parametrize("method", [("--method", "power", "--sigma-rel", "0.07"), ("--method", "ensemble", "--half-life-steps", "2")])
def test_posthoc_ema_runs_on_the_parallel_snapshots(problem, dp_shard_run, method):
    from mugen.models.dit.io import load_dit

    results = {}
    for name, run in (("single", problem["root"] / "single"), ("parallel", dp_shard_run)):
        output = problem["root"] / f"posthoc_{method[1]}_{name}"
        assert main(["posthoc-ema", "--run", str(run), *method, "--output", str(output)]) == 0
        results[name] = read_weights(output / "model.safetensors")[0]
        model, _ = load_dit(output)  # loads like a run folder
        assert model.num_parameters > 0
    for name, tensor in results["single"].items():
        torch.testing.assert_close(results["parallel"][name], tensor, atol=ATOL, rtol=RTOL)


def resume_without_saved_averages(rank: int, world_size: int, output_dir: str) -> str:
    from parallel_training import tiny_dit

    from mugen.distributed import DistributedCheckpointer, build_mesh, parallelize_dit
    from mugen.distributed.ema import AveragesCheckpointer
    from mugen.distributed.mesh import ParallelConfig
    from mugen.errors import MugenError
    from mugen.train.ema import EMA, PowerFunctionEMA

    config = ParallelConfig(param_dtype="fp32", dp_shard=2)
    model = parallelize_dit(tiny_dit(), build_mesh(config, device_type="cpu"), config)
    DistributedCheckpointer(output_dir, model).save(1, {})
    averages = {"ema": EMA(model, 0.9), "power_ema_0.0500": PowerFunctionEMA(model, 0.05)}
    try:
        AveragesCheckpointer(output_dir, model, averages=averages).load()
    except MugenError as error:
        return str(error)
    return "loaded"


def test_resuming_a_checkpoint_without_averages_is_a_clear_error(tmp_path):
    messages = run_distributed(resume_without_saved_averages, 2, args=(str(tmp_path),))
    assert all("holds no ema, power_ema_0.0500: it was saved without them" in message for message in messages), messages
