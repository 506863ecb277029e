"""Context parallelism matches the single-process MUG-DiT: loss, gradients, weights after 3 AdamW steps.

Every rank trains a single-process reference and the context-parallel copy from the same weights
on the same batch, with the real flow objective: image-to-video frame masks, padded text tokens,
a token count (N + 2 = 29 or 20) that the group size does not always divide, a step without any
conditioned frame (the model's in-place boundary-token path) and a new shape on every step.
Tolerances (fp32): loss 1e-5 relative, gradients 1e-4 of the largest entry of each tensor,
weights 5e-5 absolute after 3 steps at lr 1e-3.
"""

import pytest
import torch
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
from mugen.flow.objective import flow_matching_loss
from mugen.models.dit.model import MUGDiT
from mugen.models.dit.presets import dit_config
from mugen.models.text.base import TextFeatures
from mugen.train.tasks import model_velocity_fn

LATENT_CHANNELS = 4
TEXT_DIM = 32
TEXT_TOKENS = 6
# (latent frames, height, width) per step -> N + 2 = 3*3*3 + 2 = 29, 2*3*3 + 2 = 20, 3*2*3 + 2 = 20 tokens
STEP_SHAPES = [(3, 6, 6), (2, 6, 6), (3, 4, 6)]
STEP_CONDITIONED = [True, False, True]  # step 2: no conditioned frame at all


def tiny_dit() -> MUGDiT:
    torch.manual_seed(0)
    config = dit_config("debug", depth=2, text_dim=TEXT_DIM, latent_channels=LATENT_CHANNELS)
    model = MUGDiT(config)
    with torch.no_grad():  # the zero-initialised output head and cross-attention would hide gradients
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def step_batch(step: int, batch_size: int = 2) -> dict:
    """The same batch on every rank: latents, padded text, i2v frame mask, noise and flow times."""
    generator = torch.Generator().manual_seed(100 + step)
    frames, height, width = STEP_SHAPES[step]
    x0 = torch.randn(batch_size, LATENT_CHANNELS, frames, height, width, generator=generator)
    text_mask = torch.ones(batch_size, TEXT_TOKENS, dtype=torch.bool)
    text_mask[1, 4:] = False  # sample 1 has two padded text tokens
    frame_cond_mask = torch.zeros(batch_size, frames, dtype=torch.bool)
    if STEP_CONDITIONED[step]:
        frame_cond_mask[0, 0] = True  # sample 0: image-to-video, its first latent frame is clean
    return {
        "x0": x0,
        "text": TextFeatures(torch.randn(batch_size, TEXT_TOKENS, TEXT_DIM, generator=generator), text_mask),
        "frame_cond_mask": frame_cond_mask,
        "t": torch.rand(batch_size, generator=generator),
        "noise": torch.randn(x0.shape, generator=generator),
        "sample_weight": torch.tensor([1.0, 0.3]),
    }


def flow_loss(model: MUGDiT, batch: dict) -> torch.Tensor:
    velocity = model_velocity_fn(model, batch["text"], None)
    per_sample = flow_matching_loss(
        velocity, batch["x0"], batch["t"], batch["noise"], batch["frame_cond_mask"], batch["sample_weight"]
    )
    return per_sample.mean()


def train(model: MUGDiT, after_backward=None) -> tuple[list[float], list[dict], dict]:
    """3 AdamW steps; returns the losses, the gradients of each step and the final weights."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    losses, grads = [], []
    for step in range(len(STEP_SHAPES)):
        optimizer.zero_grad(set_to_none=True)
        loss = flow_loss(model, step_batch(step))
        loss.backward()
        if after_backward is not None:
            after_backward()
        losses.append(float(loss.detach()))
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        optimizer.step()
    return losses, grads, {name: p.detach().clone() for name, p in model.state_dict().items()}


def _context_parallel_parity(rank: int, world_size: int, attention: str) -> dict:
    torch.manual_seed(0)
    reference_losses, reference_grads, reference_weights = train(tiny_dit())

    model = tiny_dit()
    group = torch.distributed.group.WORLD
    handle = apply_context_parallel(model, group, attention=attention)
    losses, grads, weights = train(model, after_backward=lambda: average_gradients(model, group))
    handle.remove()

    loss_error = max(abs(a - b) / abs(b) for a, b in zip(losses, reference_losses))
    grad_error = max(
        float((grads[step][name] - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
        for step in range(len(grads))
        for name, reference in reference_grads[step].items()
    )
    weight_error = max(float((weights[name] - reference).abs().max()) for name, reference in reference_weights.items())
    nonzero_grads = all(float(g.abs().max()) > 0 for g in reference_grads[0].values())
    return {
        "loss_error": loss_error,
        "grad_error": grad_error,
        "weight_error": weight_error,
        "nonzero_grads": nonzero_grads,
        "losses": losses,
        "state_dict_keys": sorted(weights) == sorted(reference_weights),
    }


def _ring_attention_op(rank: int, world_size: int, length: int) -> dict:
    """The ring attention function alone against full SDPA, outputs and q/k/v gradients."""
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, length, 12, generator=generator) for _ in range(3))
    grad_out = torch.randn(2, 3, length, 12, generator=generator)
    full = [tensor.clone().requires_grad_() for tensor in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(*full)
    expected.backward(grad_out)

    state = _ContextState(group=torch.distributed.group.WORLD, rank=rank, world=world_size)
    state.layout = SequenceLayout(length, world_size)
    local = [shard_sequence(tensor, 2, state).clone().requires_grad_() for tensor in (q, k, v)]
    out = _RingAttention.apply(*local, state)
    out.backward(shard_sequence(grad_out, 2, state))
    gathered = gather_sequence(out.detach(), 2, state)
    errors = {"out": float((gathered - expected.detach()).abs().max())}
    for name, mine, reference in zip("qkv", local, full):
        errors[name] = float((gather_sequence(mine.grad, 2, state) - reference.grad).abs().max())
    return errors


@pytest.mark.parametrize(("world_size", "length"), [(2, 9), (4, 9)])  # 4 ranks: chunks of 3, 3, 3 and 0 tokens
def test_ring_attention_matches_full_attention(world_size, length):
    for errors in run_distributed(_ring_attention_op, world_size, args=(length,)):
        assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize(
    ("world_size", "attention"), [(2, "ring"), (2, "allgather"), (4, "ring")]
)
def test_context_parallel_training_matches_single_process(world_size, attention):
    results = run_distributed(_context_parallel_parity, world_size, args=(attention,))
    for rank, result in enumerate(results):
        assert result["nonzero_grads"], "the reference has all-zero gradients: the test would not see errors"
        assert result["state_dict_keys"], "context parallelism changed the state dict keys"
        assert result["loss_error"] < 1e-5, (rank, result)
        assert result["grad_error"] < 1e-4, (rank, result)
        assert result["weight_error"] < 5e-5, (rank, result)
    assert all(result["losses"] == results[0]["losses"] for result in results), "ranks disagree on the loss"
