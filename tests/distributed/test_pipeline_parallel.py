"""Pipeline parallelism matches the single-process MUG-DiT: loss, gradients, weights after 3 AdamW steps.

Each rank trains the single-process reference on the whole batch and its pipeline stages with a
torch.distributed.pipelining schedule over micro-batches, from the same weights, on the same
batches (real flow objective, image-to-video frame mask, padded text, image-weighted samples) with
a new latent shape (sequence length) on every step, gradients clipped by the norm over all stages
(which must equal the single-process norm). Tolerances (fp32): loss 1e-5 relative,
gradients 1e-4 of the largest entry of each tensor, weights 1e-4 absolute after 3 AdamW steps at
lr 1e-3, a tenth of one step (measured at most: 2e-7, 2.2e-5, 1.2e-5).
"""

import pytest
import torch
from dit_parity import compare, step_batch, tiny_dit, train, train_reference
from launcher import DistributedTestFailure, run_distributed

from mugen.distributed.pipeline import PipelinedDiT, stage_block_ranges
from mugen.errors import MugenError

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
