"""`mugen train dit --parallel` with pipeline stages (pp) and with cp x tp gives the single-process losses.

The reference is the single-process `mugen train dit` on a tiny manifest (global batch 4, 2
micro-batches per step, gradient clipping that acts, a depth-2 model: one block per stage). The
same command on pp=2 (2 processes, 2 pipeline micro-batches per step), pp=2 x dp_shard=2 (4
processes: FSDP2 over the two ranks of each stage, 2 samples per data-parallel group) and cp=2 x
tp=2 (4 processes) must log the same losses and gradient norms for 3 steps (rtol 1e-5, as
test_distributed_train.py: fp32 sums in another order move the last bits). The pipeline runs are
then resumed from their step-3 sharded checkpoint for a 4th step (pp=2 on pp=2; pp=2 x dp_shard=2
on dp_shard=2, a layout without stages), which must log the reference's 4th loss.

With --balanced (seed §5.2; the data of test_distributed_train_balanced.py, whose micro-batches of 2
videos, 3 images and 1 video do not all split into 2 pipeline micro-batches), pp=2 (resumed after 2
steps on dp_shard=2) and pp=2 x dp_shard=2 (a group gets no row of some micro-batches) log the
single-process --balanced losses (rtol 1e-5), and pp=2 x dp_shard=2 logs the cost split's
``rank_cost_imbalance`` and rank 0's samples.
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
BATCH = 4
LOSS_RTOL = 1e-5
CONFIG = {
    "train": {
        "lr": 1e-3, "log_every": 1, "checkpoint_every": 2, "prefetch": 0, "grad_clip": 0.2, "warmup_steps": 1, "grad_accum": 2,
        "decay": "constant",  # the learning rate of step 3 must not depend on --steps (3, then 4 on resume)
    },
    "model": {"depth": 2},
}


def train_command(manifest: Path, config: Path, output: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train", "dit", "--manifest", str(manifest), "--output", str(output), "--config", str(config),
        "--steps", str(steps), "--batch-size", str(BATCH), "--seed", "5", *extra,
    ]


def train_on_rank(rank: int, world_size: int, argv: list[str]) -> int:
    return main(argv)


def logged(output: Path, name: str) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = {record["step"]: record[name] for record in records if name in record}
    return [values[step] for step in sorted(values)]


@pytest.fixture(scope="module")
def problem(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dtrain_pp")
    manifest = build_latent_dataset(root / "data", videos=8, images=4)  # 2 video batches and 1 image batch per epoch
    config = root / "config.json"
    config.write_text(json.dumps(CONFIG))
    reference = root / "single"
    assert main(train_command(manifest, config, reference, STEPS)) == 0
    losses = logged(reference, "loss")
    assert len(losses) == STEPS and len(set(losses)) == STEPS
    norms = logged(reference, "grad_norm")
    assert min(norms) > CONFIG["train"]["grad_clip"], "clipping must act, so that the norm over stages matters"
    return {"root": root, "manifest": manifest, "config": config, "losses": losses, "norms": norms}


@pytest.mark.parametrize(
    "layout, world_size, resume_layout, resume_world_size",
    [
        ("pp=2,pp_microbatches=2", 2, "pp=2,pp_microbatches=2", 2),
        # resumed without stages: the pipeline checkpoint is an ordinary sharded one
        ("pp=2,dp_shard=2,pp_microbatches=2", 4, "dp_shard=2", 2),
        # stages of tensor-parallel blocks (tp slices travel between stages), resumed on tp alone
        ("pp=2,tp=2,pp_microbatches=2", 4, "tp=2", 2),
        ("cp=2,tp=2", 4, None, 0),
    ],
)
def test_parallel_run_gives_single_process_losses(problem, layout, world_size, resume_layout, resume_world_size):
    output = problem["root"] / layout.replace("=", "").replace(",", "_")
    argv = train_command(problem["manifest"], problem["config"], output, STEPS - 1, "--parallel", layout)
    assert run_distributed(train_on_rank, world_size, args=(argv,)) == [0] * world_size
    assert logged(output, "loss") == pytest.approx(problem["losses"][: STEPS - 1], rel=LOSS_RTOL)
    # the gradient norm over all stages / shards is the single-process one (clipping acts: it is above 0.2)
    assert logged(output, "grad_norm") == pytest.approx(problem["norms"][: STEPS - 1], rel=LOSS_RTOL)
    checkpoint = output / "checkpoints" / f"step_{STEPS - 1:08d}"
    assert (checkpoint / ".metadata").is_file()
    assert json.loads((checkpoint / "meta.json").read_text())["world_size"] == world_size
    if resume_layout is None:
        return
    argv = train_command(problem["manifest"], problem["config"], output, STEPS, "--parallel", resume_layout)
    assert run_distributed(train_on_rank, resume_world_size, args=(argv,)) == [0] * resume_world_size
    assert logged(output, "loss") == pytest.approx(problem["losses"], rel=LOSS_RTOL)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"pp": 2, "pp_microbatches": 3}, "shares of [4] samples, which do not split into pp_microbatches=3"),
        ({"pp": 2, "dp_shard": 2, "pp_microbatches": 2}, "shares of [1, 2] samples"),  # batch 3 over 2 groups
        ({"pp": 2, "pp_schedule": "Interleaved1F1B"}, "keeps one stage per rank"),
        ({"pp": 2, "pp_microbatches": 1}, "1F1B schedule needs at least as many micro-batches as stages"),
    ],
)
def test_pipeline_layouts_that_cannot_run_are_refused_before_starting(layout, message):
    from mugen.distributed.mesh import ParallelConfig
    from mugen.errors import MugenError
    from mugen.train.pipeline_run import PipelineRun

    with pytest.raises(MugenError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PipelineRun(ParallelConfig(**layout), "cpu", (BATCH - 1 if layout.get("dp_shard") else BATCH, None))


# --balanced over pipeline stages (seed §5.2): the data of test_distributed_train_balanced.py (5 videos of
# 14 tokens, 3 images of 6 tokens, batch size 2 of the costliest shape, 2 micro-batches per step), whose
# balanced micro-batches hold 2 videos, 3 images and 1 video: shares that do not split into the 2 pipeline
# micro-batches are padded with zero-weight rows, and with dp_shard=2 one rank gets no row of a micro-batch.
BALANCED_STEPS = 3
BALANCED_CONFIG = {
    "train": {"lr": 1e-3, "log_every": 1, "checkpoint_every": 2, "prefetch": 0, "warmup_steps": 1, "grad_accum": 2},
    "model": {"depth": 2},
}


def balanced_command(problem: dict, output: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train", "dit", "--manifest", str(problem["manifest"]), "--output", str(output), "--config", str(problem["config"]),
        "--steps", str(steps), "--batch-size", "2", "--seed", "1", "--balanced", *extra,
    ]


def balanced_step_micro_batches(manifest: Path) -> list[tuple[list[int], list[float]]]:
    """(rows, cost of one row) of each micro-batch of each step of the single-process balanced run."""
    from mugen.data.balanced import BalancedBatchSampler, SampleCost, dit_tokens_for_shape_key
    from mugen.data.datasets import LatentTextDataset
    from mugen.models.dit import dit_config

    dataset = LatentTextDataset(manifest)
    first = dataset[0]
    config = dit_config("debug", depth=2, text_dim=first["text_states"].shape[-1], latent_channels=first["latents"].shape[0])
    keys = dataset.shape_keys()
    sampler = BalancedBatchSampler(
        keys, [dit_tokens_for_shape_key(key, config.patch_size) for key in keys],
        SampleCost.for_dit(config, text_tokens=first["text_states"].shape[0]),
        batch_size=2, micro_batches=2, seed=1, world_size=1, rank=0,
    )
    steps = []
    for step in range(BALANCED_STEPS):
        units = sampler.step_plan(step * sampler.units_per_step).rank_batches[0]
        steps.append(([len(unit) for unit in units], [sampler.sample_cost(unit[0]) for unit in units]))
    return steps


@pytest.fixture(scope="module")
def balanced_problem(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dtrain_pp_balanced")
    problem = {"root": root, "manifest": build_latent_dataset(root / "data", videos=5, images=3), "config": root / "config.json"}
    problem["config"].write_text(json.dumps(BALANCED_CONFIG))
    assert main(balanced_command(problem, root / "single", BALANCED_STEPS)) == 0
    problem["losses"] = logged(root / "single", "loss")
    assert len(problem["losses"]) == BALANCED_STEPS
    sizes = [size for sizes, _ in balanced_step_micro_batches(problem["manifest"]) for size in sizes]
    assert any(size % 2 for size in sizes), "some micro-batch must not split into the 2 pipeline micro-batches"
    return problem


def test_balanced_pipeline_run_gives_single_process_losses_and_resumes_without_stages(balanced_problem):
    """pp=2: 2 steps, then a new job from the sharded checkpoint on dp_shard=2 (the sampler's global position carries over)."""
    output = balanced_problem["root"] / "pp2"
    argv = balanced_command(balanced_problem, output, BALANCED_STEPS - 1, "--parallel", "pp=2,pp_microbatches=2")
    assert run_distributed(train_on_rank, 2, args=(argv,)) == [0, 0]
    assert logged(output, "loss") == pytest.approx(balanced_problem["losses"][:-1], rel=LOSS_RTOL)
    argv = balanced_command(balanced_problem, output, BALANCED_STEPS, "--parallel", "dp_shard=2")
    assert run_distributed(train_on_rank, 2, args=(argv,)) == [0, 0]
    assert logged(output, "loss") == pytest.approx(balanced_problem["losses"], rel=LOSS_RTOL)


def test_balanced_pipeline_with_data_parallel_stages_splits_rows_by_cost(balanced_problem):
    """pp=2 x dp_shard=2: the single-process losses, and each data-parallel group's rows are the balanced split."""
    from mugen.data.balanced import imbalance, row_split_plan

    output = balanced_problem["root"] / "pp2_dp2"
    argv = balanced_command(balanced_problem, output, BALANCED_STEPS, "--parallel", "pp=2,dp_shard=2,pp_microbatches=2")
    assert run_distributed(train_on_rank, 4, args=(argv,)) == [0] * 4
    assert logged(output, "loss") == pytest.approx(balanced_problem["losses"], rel=LOSS_RTOL)
    steps = balanced_step_micro_batches(balanced_problem["manifest"])
    plans = [row_split_plan(sizes, costs, 2) for sizes, costs in steps]
    assert any(0 in counts for counts_of_step, _ in plans for counts in counts_of_step)  # a group without rows
    assert logged(output, "rank_cost_imbalance") == pytest.approx([imbalance(costs) for _, costs in plans], rel=1e-6, abs=1e-9)
    assert logged(output, "samples") == [sum(counts[0] for counts in counts_of_step) for counts_of_step, _ in plans]
