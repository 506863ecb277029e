"""`mugen train dit --balanced --parallel dp_shard=2` (seed §5.2): the single-process losses, balanced rank costs.

Data: 5 videos (3x4x4 latents, 14 tokens) and 3 images (1x4x4, 6 tokens), batch size 2 of the costliest
shape, 2 micro-batches per step: the balanced sampler makes micro-batches of 2 videos, 3 images and
the video bucket's remainder (1 video), so some micro-batches have fewer rows than ranks and the
first step holds two odd-sized ones (3 images + 1 video).

* The 2-process run logs the losses of the single-process --balanced run (rtol 1e-5, as in
  test_distributed_train.py): every rank reads the global step and takes its rows, weighted so the
  FSDP gradient is the single-process one.
* Each rank's step cost, recomputed from the sampler's plan, is within one sample's cost of the
  other's, never worse than the plain contiguous split (DataParallelShare's) and better on a step
  where that split is lopsided; the run logs that imbalance (``rank_cost_imbalance``) and rank 0's
  number of samples matches the split.
* A run stopped after 2 steps and resumed from its sharded checkpoint (on dp_shard=2 or tp=2) logs the
  same third loss.
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
from mugen.data.balanced import imbalance, row_split_plan, split_rows  # noqa: E402

STEPS = 3
BATCH = 2
SEED = 1
GRAD_ACCUM = 2
LOSS_RTOL = 1e-5
CONFIG = {
    "train": {"lr": 1e-3, "log_every": 1, "checkpoint_every": 2, "prefetch": 0, "warmup_steps": 1, "grad_accum": GRAD_ACCUM},
    "model": {"depth": 2},
}


def train_command(problem: dict, output: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train", "dit", "--manifest", str(problem["manifest"]), "--output", str(output), "--config", str(problem["config"]),
        "--steps", str(steps), "--batch-size", str(BATCH), "--seed", str(SEED), "--balanced", *extra,
    ]


def train_on_rank(rank: int, world_size: int, argv: list[str]) -> int:
    return main(argv)


def logged(output: Path, name: str) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = {record["step"]: record[name] for record in records if name in record}
    return [values[step] for step in sorted(values)]


def step_micro_batches(manifest: Path) -> list[tuple[list[int], list[float]]]:
    """(rows, cost of one row) of each micro-batch of each step, from the sampler `mugen train dit --balanced` builds."""
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
        batch_size=BATCH, micro_batches=GRAD_ACCUM, seed=SEED, world_size=1, rank=0,
    )
    steps = []
    for step in range(STEPS):
        units = sampler.step_plan(step * sampler.units_per_step).rank_batches[0]
        steps.append(([len(unit) for unit in units], [sampler.sample_cost(unit[0]) for unit in units]))
    return steps


@pytest.fixture(scope="module")
def problem(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dtrain_balanced")
    problem = {"root": root, "manifest": build_latent_dataset(root / "data", videos=5, images=3), "config": root / "config.json"}
    problem["config"].write_text(json.dumps(CONFIG))
    assert main(train_command(problem, root / "single", STEPS)) == 0
    problem["losses"] = logged(root / "single", "loss")
    assert len(problem["losses"]) == STEPS
    return problem


def test_split_rows_keeps_ranks_within_one_sample():
    loads = [0.0, 0.0, 0.0]
    assert split_rows(7, 2.0, loads) == [3, 2, 2] and loads == [6.0, 4.0, 4.0]
    assert split_rows(2, 5.0, loads) == [0, 1, 1] and loads == [6.0, 9.0, 9.0]  # remainders go to the least loaded
    assert split_rows(1, 1.0, loads) == [1, 0, 0]
    counts, costs = row_split_plan([3, 5, 1, 1, 2], [4.0, 1.0, 3.0, 3.0, 2.0], 2)
    assert [sum(rows) for rows in counts] == [3, 5, 1, 1, 2]
    assert max(costs) - min(costs) <= 4.0 and sum(costs) == pytest.approx(3 * 4 + 5 + 3 + 3 + 2 * 2)


def test_balanced_parallel_run_gives_single_process_losses_and_even_costs(problem):
    output = problem["root"] / "dp_shard2"
    argv = train_command(problem, output, STEPS, "--parallel", "dp_shard=2")
    assert run_distributed(train_on_rank, 2, args=(argv,)) == [0, 0]
    assert logged(output, "loss") == pytest.approx(problem["losses"], rel=LOSS_RTOL)

    steps = step_micro_batches(problem["manifest"])
    assert any(size < 2 for sizes, _ in steps for size in sizes)  # a micro-batch leaves one rank without rows
    balanced, naive = [], []
    for sizes, costs in steps:
        counts, rank_costs = row_split_plan(sizes, costs, 2)
        assert max(rank_costs) - min(rank_costs) <= max(costs) + 1e-12  # within one sample
        balanced.append(imbalance(rank_costs))
        # DataParallelShare's contiguous split: rank 0 rows [0, B//2), rank 1 the rest (all remainders)
        naive.append(imbalance([sum(size // 2 * cost for size, cost in zip(sizes, costs)),
                                sum((size - size // 2) * cost for size, cost in zip(sizes, costs))]))
        assert balanced[-1] <= naive[-1] + 1e-12
    assert min(n - b for n, b in zip(naive, balanced)) >= 0 and max(n - b for n, b in zip(naive, balanced)) > 0.05
    assert max(balanced) < 0.5
    assert logged(output, "rank_cost_imbalance") == pytest.approx(balanced, rel=1e-6, abs=1e-9)
    rank0_rows = [sum(counts[0] for counts in row_split_plan(sizes, costs, 2)[0]) for sizes, costs in steps]
    assert logged(output, "samples") == rank0_rows


@pytest.mark.parametrize("resume_layout", ["dp_shard=2", "tp=2"])
def test_balanced_parallel_run_resumes_exactly(problem, resume_layout):
    """Stopped after 2 steps on dp_shard=2, resumed on the same layout or on tp=2 (the global position carries over)."""
    output = problem["root"] / f"resumed_{resume_layout.replace('=', '')}"
    for steps, layout in ((2, "dp_shard=2"), (STEPS, resume_layout)):
        argv = train_command(problem, output, steps, "--parallel", layout)
        assert run_distributed(train_on_rank, 2, args=(argv,)) == [0, 0]
    assert logged(output, "loss") == pytest.approx(problem["losses"], rel=LOSS_RTOL)
    state = json.loads((output / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())
    assert state["world_size"] == 2
