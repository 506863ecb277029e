"""Context parallelism matches the single-process MUG-DiT: loss, gradients, weights after 3 AdamW steps.

Every rank trains a single-process reference and the context-parallel copy from the same weights
on the same batches, with the real flow objective: an image-to-video frame mask, padded text
tokens, token counts (N + 2 = 29, then 20) that the group size does not always divide, a step
without any conditioned frame (the model's in-place boundary-token path) and a new shape each step;
also with every block recomputed in backward (activation checkpointing wraps the block's forward).
Tolerances (fp32): loss 1e-5 relative, gradients 1e-4 of the largest entry of each tensor, weights
1e-4 absolute after 3 AdamW steps at lr 1e-3, a tenth of one step (measured at most: 1e-7, 6e-6, 6e-6).
"""

import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from dit_parity import compare, flow_loss, step_batch, tiny_dit, train, train_reference
from launcher import run_distributed

from mugen.distributed.context_parallel import (
    SequenceLayout,
    _ContextState,
    _RingAttention,
    apply_context_parallel,
    average_gradients,
    gather_sequence,
    shard_sequence,
)
from mugen.errors import MugenError


def _recompute_blocks(model) -> None:
    """Full activation checkpointing the way distributed/activation.py applies it: forward wrapped in place."""
    for block in model.blocks:
        forward = block.forward
        block.forward = functools.partial(checkpoint, forward, use_reentrant=False)


def _context_parallel_parity(rank: int, world_size: int, attention: str, recompute: bool = False) -> dict:
    reference = train_reference()
    model = tiny_dit()
    group = torch.distributed.group.WORLD
    handle = apply_context_parallel(model, group, attention=attention)
    if recompute:
        _recompute_blocks(model)
    run = train(
        model.named_parameters(),
        lambda step: flow_loss(model, step_batch(step)),
        after_backward=lambda: average_gradients(model, group),
    )
    handle.remove()
    result = compare(run, reference)
    result["all_parameters"] = result["names"] == sorted(name for name, _ in tiny_dit().named_parameters())
    return result


def _ring_attention_op(rank: int, world_size: int, length: int, kernel: str, dtype=torch.float32) -> dict:
    """The ring attention function alone against full fp32 SDPA: output and q/k/v gradients."""
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, length, 12, generator=generator).to(dtype) for _ in range(3))
    grad_out = torch.randn(2, 3, length, 12, generator=generator).to(dtype)
    full = [tensor.float().clone().requires_grad_() for tensor in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(*full)
    expected.backward(grad_out.float())

    state = _ContextState(group=torch.distributed.group.WORLD, rank=rank, world=world_size)
    layout = SequenceLayout(length, world_size)
    local = [shard_sequence(tensor, 2, layout, rank).clone().requires_grad_() for tensor in (q, k, v)]
    out = _RingAttention.apply(*local, state, layout, kernel)
    out.backward(shard_sequence(grad_out, 2, layout, rank))
    errors = {"dtypes": {out.dtype, *(tensor.grad.dtype for tensor in local)} == {dtype}}
    errors["out"] = float((gather_sequence(out.detach(), 2, state, layout).float() - expected.detach()).abs().max())
    for name, mine, reference in zip("qkv", local, full):
        errors[name] = float((gather_sequence(mine.grad, 2, state, layout).float() - reference.grad).abs().max())
    return errors


@pytest.mark.parametrize(
    ("world_size", "length", "kernel", "dtype", "tolerance"),
    [
        (2, 9, "fused", torch.float32, 1e-5),
        (2, 9, "math", torch.float32, 1e-5),
        (4, 9, "fused", torch.float32, 1e-5),  # 4 ranks: chunks of 3, 3, 3 and 0 tokens
        (2, 9, "fused", torch.bfloat16, 3e-2),  # bf16 rounding of inputs and outputs (measured ~8e-3)
    ],
)
def test_ring_attention_matches_full_attention(world_size, length, kernel, dtype, tolerance):
    for errors in run_distributed(_ring_attention_op, world_size, args=(length, kernel, dtype)):
        assert errors.pop("dtypes"), "the output and gradients must keep the input dtype"
        assert max(errors.values()) < tolerance, errors


@pytest.mark.parametrize(
    ("world_size", "attention", "recompute"),
    [(2, "ring", False), (2, "allgather", False), (2, "ring", True), (4, "ring", False)],
)
def test_context_parallel_training_matches_single_process(world_size, attention, recompute):
    results = run_distributed(_context_parallel_parity, world_size, args=(attention, recompute))
    for rank, result in enumerate(results):
        assert result["nonzero_reference_grads"], "the reference has all-zero gradients: errors would go unseen"
        assert result["all_parameters"], "context parallelism changed the parameter names"
        assert result["loss_error"] < 1e-5, (rank, result)
        assert result["grad_error"] < 1e-4, (rank, result)
        assert result["weight_error"] < 1e-4, (rank, result)
    assert all(result["losses"] == results[0]["losses"] for result in results), "ranks disagree on the loss"


def test_unknown_choices_are_user_errors():
    with pytest.raises(MugenError, match="attention='flash'; choose one of ring, allgather"):
        apply_context_parallel(tiny_dit(), None, attention="flash")
    with pytest.raises(MugenError, match="ring_kernel='triton'"):
        apply_context_parallel(tiny_dit(), None, ring_kernel="triton")
    with pytest.raises(MugenError, match="expected a 1-D DeviceMesh or a ProcessGroup"):
        apply_context_parallel(tiny_dit(), "cp")


def test_layout_pads_only_the_last_chunks():
    layout = SequenceLayout(length=9, world=4)
    assert (layout.chunk, layout.padded_length) == (3, 12)
    assert [layout.valid_tokens(rank) for rank in range(4)] == [3, 3, 3, 0]
    tokens = torch.arange(9).view(1, 9)
    assert [shard_sequence(tokens, 1, layout, rank, pad_value=-1).tolist() for rank in (2, 3)] == [[[6, 7, 8]], [[-1, -1, -1]]]
