"""Shared pieces of the MUG-DiT parity tests: a tiny model, step batches, the reference training run.

Every rank builds the same model (fixed seed) and the same batches, trains a single-process
reference itself, and compares its parallel run against it.
"""

import torch

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
LEARNING_RATE = 1e-3


def tiny_dit(depth: int = 2) -> MUGDiT:
    torch.manual_seed(0)
    config = dit_config("debug", depth=depth, text_dim=TEXT_DIM, latent_channels=LATENT_CHANNELS)
    model = MUGDiT(config)
    with torch.no_grad():  # the zero-initialised output head and cross-attention would hide gradients
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def step_batch(step: int, batch_size: int = 2) -> dict:
    """The same batch on every rank: latents, padded text, i2v frame mask, noise, flow times, weights."""
    generator = torch.Generator().manual_seed(100 + step)
    frames, height, width = STEP_SHAPES[step]
    x0 = torch.randn(batch_size, LATENT_CHANNELS, frames, height, width, generator=generator)
    text_mask = torch.ones(batch_size, TEXT_TOKENS, dtype=torch.bool)
    text_mask[1::2, 4:] = False  # every second sample has two padded text tokens
    frame_cond_mask = torch.zeros(batch_size, frames, dtype=torch.bool)
    if STEP_CONDITIONED[step]:
        frame_cond_mask[0, 0] = True  # sample 0: image-to-video, its first latent frame is clean
    return {
        "x0": x0,
        "text": TextFeatures(torch.randn(batch_size, TEXT_TOKENS, TEXT_DIM, generator=generator), text_mask),
        "frame_cond_mask": frame_cond_mask,
        "t": torch.rand(batch_size, generator=generator),
        "noise": torch.randn(x0.shape, generator=generator),
        "sample_weight": torch.tensor([1.0, 0.3] * (batch_size // 2)),  # video, image (the task's 0.3)
    }


def flow_loss(model: MUGDiT, batch: dict) -> torch.Tensor:
    """The single-process DiT task's loss: weighted per-sample flow loss, averaged."""
    velocity = model_velocity_fn(model, batch["text"], None)
    per_sample = flow_matching_loss(
        velocity, batch["x0"], batch["t"], batch["noise"], batch["frame_cond_mask"], batch["sample_weight"]
    )
    return per_sample.mean()


def train(named_parameters, step_loss, after_backward=None) -> tuple[list[float], list[dict], dict]:
    """3 AdamW steps of ``step_loss(step) -> loss``; returns losses, each step's gradients, final weights.

    ``after_backward()`` runs after each backward (gradient averaging, clipping); what it returns
    on each step is kept in ``losses`` beside the loss, as ``(loss, value)``.
    """
    named = dict(named_parameters)
    optimizer = torch.optim.AdamW(named.values(), lr=LEARNING_RATE, weight_decay=0.01)
    losses, grads = [], []
    for step in range(len(STEP_SHAPES)):
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss(step)
        if loss.requires_grad:
            loss.backward()
        extra = after_backward() if after_backward is not None else None
        losses.append(float(loss.detach()) if extra is None else (float(loss.detach()), float(extra)))
        grads.append({name: p.grad.clone() for name, p in named.items()})
        optimizer.step()
    return losses, grads, {name: p.detach().clone() for name, p in named.items()}


def clipped(model_parameters, max_norm: float):
    """An ``after_backward`` that clips the single-process gradients and returns their norm."""
    parameters = list(model_parameters)
    return lambda: torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def train_reference(depth: int = 2, batch_size: int = 2, max_norm: float | None = None):
    """The single-process run; with ``max_norm``, gradients are clipped and losses are (loss, grad norm)."""
    model = tiny_dit(depth)
    after = clipped(model.parameters(), max_norm) if max_norm is not None else None
    return train(list(model.named_parameters()), lambda step: flow_loss(model, step_batch(step, batch_size)), after)


def compare(run, reference) -> dict:
    """Errors of a run against the reference on the parameters the run holds.

    loss: relative; grad: max abs error over the largest entry of each tensor; weight: max abs.
    """
    losses, grads, weights = run
    reference_losses, reference_grads, reference_weights = reference
    pairs = [
        (mine, theirs)
        for ours, reference_values in zip(losses, reference_losses)
        for mine, theirs in zip(ours if isinstance(ours, tuple) else (ours,), reference_values if isinstance(reference_values, tuple) else (reference_values,))
    ]
    return {
        "loss_error": max(abs(a - b) / abs(b) for a, b in pairs),  # also the grad norms when recorded
        "grad_error": max(
            float((grads[step][name] - reference_grads[step][name]).abs().max() / reference_grads[step][name].abs().max())
            for step in range(len(grads))
            for name in grads[step]
        ),
        "weight_error": max(float((weights[name] - reference_weights[name]).abs().max()) for name in weights),
        "nonzero_reference_grads": all(float(g.abs().max()) > 0 for g in reference_grads[0].values()),
        "losses": losses,
        "names": sorted(weights),
    }
