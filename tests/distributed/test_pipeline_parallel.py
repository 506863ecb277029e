"""Pipeline parallelism matches the single-process MUG-DiT: loss, gradients, weights after 3 AdamW steps.

Each rank trains the single-process reference on the whole batch and its pipeline stages with a
torch.distributed.pipelining schedule over micro-batches, from the same weights, on the same
batches (real flow objective, image-to-video frame mask, padded text, image-weighted samples) with
a new latent shape (sequence length) on every step, gradients clipped by the norm over all stages
(which must equal the single-process norm). Tolerances (fp32): loss 1e-5 relative,
gradients 1e-4 of the largest entry of each tensor, weights 1e-4 absolute after 3 AdamW steps at
lr 1e-3, a tenth of one step (measured at most: 2e-7, 2.2e-5, 1.2e-5).

The same through ``parallelize_dit`` on 4 processes, same tolerances (deviations printed with -s;
measured at most 1.7e-7, 2.2e-5, 1.0e-5): pp=2 x tp=2 (tensor-parallel blocks in each stage, tp
slices of the hidden states sent between stages, step 0's 29 tokens padded to 30, every block
recomputed in backward), pp=2 x dp_shard=2 (each stage under FSDP2, each data-parallel group 2 of
the 4 samples) and pp=2 x cp=2 (ring attention inside each stage, cp chunks sent between stages,
FSDP2 over the cp ranks).
"""

import pytest
import torch
from dit_parity import LEARNING_RATE, STEP_SHAPES, compare, step_batch, tiny_dit, train, train_reference
from launcher import DistributedTestFailure, run_distributed
from parallel_training import full_value
from torch.distributed.tensor import DTensor

from mugen.distributed.mesh import ParallelConfig, build_mesh
from mugen.distributed.parallelize import data_parallel_rank, parallelize_dit
from mugen.distributed.pipeline import PipelinedDiT, stage_block_ranges
from mugen.distributed.tensor_parallel import FUSED_ROWS_ATTRIBUTE
from mugen.errors import MugenError
from mugen.models.text.base import TextFeatures

DEPTH = 4
BATCH = 4
MAX_NORM = 0.5  # below the gradient norms (measured 0.75-0.87), so clipping acts on every step


def _pipeline_parity(rank: int, world_size: int, schedule: str, stages_per_rank: int, n_microbatches: int) -> dict:
    reference = train_reference(DEPTH, BATCH, max_norm=MAX_NORM)
    pipe = PipelinedDiT(tiny_dit(DEPTH), torch.distributed.group.WORLD, n_microbatches, schedule, stages_per_rank)

    def step_loss(step: int) -> torch.Tensor:
        batch = step_batch(step, BATCH)
        per_sample = pipe.flow_step(
            batch["x0"], batch["text"], batch["t"], batch["noise"], batch["frame_cond_mask"],
            sample_weight=batch["sample_weight"],
        )
        return (per_sample * batch["sample_weight"]).mean()

    result = compare(train(list(pipe.named_parameters()), step_loss, lambda: pipe.clip_grad_norm_(MAX_NORM)), reference)
    result["shapes_cached"] = len(pipe._schedules)
    return result


@pytest.mark.parametrize(
    ("world_size", "schedule", "stages_per_rank", "n_microbatches"),
    [(2, "1F1B", 1, 2), (2, "Interleaved1F1B", 2, 2), (4, "GPipe", 1, 4)],
)
def test_pipeline_training_matches_single_process(world_size, schedule, stages_per_rank, n_microbatches):
    results = run_distributed(_pipeline_parity, world_size, args=(schedule, stages_per_rank, n_microbatches))
    every_name = sorted(name for name, _ in tiny_dit(DEPTH).named_parameters())
    held = [name for result in results for name in result["names"]]
    assert sorted(held) == every_name, "the stages must hold every parameter exactly once"
    for rank, result in enumerate(results):
        assert result["nonzero_reference_grads"]
        assert result["shapes_cached"] == 3, "one schedule per input shape"
        assert result["loss_error"] < 1e-5, (rank, result)
        assert result["grad_error"] < 1e-4, (rank, result)
        assert result["weight_error"] < 1e-4, (rank, result)


def _parallelized_pipeline_parity(rank: int, world_size: int, layout: dict) -> dict:
    """``parallelize_dit`` with pp x tp or pp x dp_shard: this rank's stage against the reference."""
    reference = train_reference(DEPTH, BATCH, max_norm=MAX_NORM)
    config = ParallelConfig(param_dtype="fp32", pp_microbatches=2, **layout)
    mesh = build_mesh(config, device_type="cpu")
    pipe = parallelize_dit(tiny_dit(DEPTH), mesh, config)
    (stage,) = pipe.stages
    fused_rows = getattr(stage, FUSED_ROWS_ATTRIBUTE, {})
    dp_index, dp_count = data_parallel_rank(mesh)
    rows = slice(dp_index * BATCH // dp_count, (dp_index + 1) * BATCH // dp_count)  # FSDP averages the groups
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    losses, grads = [], []
    for step in range(len(STEP_SHAPES)):
        optimizer.zero_grad(set_to_none=True)
        batch = step_batch(step, BATCH)
        text = TextFeatures(batch["text"].states[rows], batch["text"].mask[rows])
        weights = batch["sample_weight"][rows]
        per_sample = pipe.flow_step(
            batch["x0"][rows], text, batch["t"][rows], batch["noise"][rows], batch["frame_cond_mask"][rows],
            sample_weight=weights,
        )
        loss = (per_sample * weights).mean().reshape(1)
        torch.distributed.all_reduce(loss)  # every rank holds its group's mean: the sum / world is the batch's
        norm = pipe.clip_grad_norm_(MAX_NORM)
        losses.append((float(loss) / world_size, float(norm)))
        grads.append({name: full_value(p.grad, name, fused_rows) for name, p in stage.named_parameters()})
        optimizer.step()
    weights = {name: full_value(p, name, fused_rows) for name, p in stage.named_parameters()}
    result = compare((losses, grads, weights), reference)
    result["sharded"] = all(isinstance(p, DTensor) for p in stage.parameters())
    result["split"] = any(isinstance(p, DTensor) and p.to_local().shape != p.shape for p in stage.parameters())
    result["pp_rank"] = pipe.pp_rank
    result["recomputed"] = all("forward" in vars(block) for block in stage.blocks.values())  # wrapped in place
    return result


@pytest.mark.parametrize(
    "layout",
    [
        {"pp": 2, "tp": 2, "activation_checkpointing": "full"},  # blocks recomputed inside the schedule's backward
        {"pp": 2, "dp_shard": 2},
        {"pp": 2, "cp": 2},
    ],
    ids=["pp2_tp2_recompute", "pp2_dp_shard2", "pp2_cp2"],
)
def test_parallelized_pipeline_matches_single_process(layout):
    """The stages of ``parallelize_dit``: blocks tensor- or context-parallel (tp slices / cp chunks sent
    between stages), or stages under FSDP2."""
    results = run_distributed(_parallelized_pipeline_parity, 4, args=(layout,))
    every_name = sorted(name for name, _ in tiny_dit(DEPTH).named_parameters())
    assert sorted({name for result in results for name in result["names"]}) == every_name
    assert {result["pp_rank"] for result in results} == {0, 1}
    for rank, result in enumerate(results):
        assert result["recomputed"] == ("activation_checkpointing" in layout)
        assert result["split"], "some parameters must be split over tp, cp or dp_shard"
        if "tp" not in layout:
            assert result["sharded"], "FSDP2 shards every parameter of the stage (over dp_shard, or over cp)"
        assert result["nonzero_reference_grads"]
        assert result["loss_error"] < 1e-5, (rank, result)
        assert result["grad_error"] < 1e-4, (rank, result)
        assert result["weight_error"] < 1e-4, (rank, result)
    worst = {key: max(result[key] for result in results) for key in ("loss_error", "grad_error", "weight_error")}
    print(f"{layout}: largest deviations {worst}")


def _different_noise(rank: int, world_size: int) -> None:
    pipe = PipelinedDiT(tiny_dit(DEPTH), torch.distributed.group.WORLD, 2)
    batch = step_batch(0, BATCH)
    pipe.flow_step(batch["x0"], batch["text"], batch["t"], batch["noise"] + rank, batch["frame_cond_mask"])


def test_pipeline_refuses_noise_that_differs_between_stages():
    with pytest.raises(DistributedTestFailure, match="different latents, flow times or noise"):
        run_distributed(_different_noise, 2)


def test_stage_block_ranges_cover_the_depth():
    assert stage_block_ranges(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(MugenError, match="at most as many stages"):
        stage_block_ranges(2, 3)


def test_schedule_choices_are_user_errors():
    with pytest.raises(MugenError, match="choose one of 1F1B, GPipe, Interleaved1F1B"):
        PipelinedDiT(tiny_dit(DEPTH), None, 2, schedule="ZeroBubble")
    with pytest.raises(MugenError, match="Interleaved1F1B needs stages_per_rank >= 2"):
        PipelinedDiT(tiny_dit(DEPTH), None, 2, schedule="Interleaved1F1B", stages_per_rank=1)
