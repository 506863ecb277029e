"""The tiny MUG-DiT training problem shared by the distributed tests.

Every rank builds the same model (fixed seed) and the same global batches (identical noise and
flow times everywhere); a data-parallel group takes its share of the samples.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from mugen.distributed.tensor_parallel import canonical_rows
from mugen.flow.objective import flow_matching_loss
from mugen.models.dit.model import MUGDiT
from mugen.models.dit.presets import dit_config
from mugen.models.text.base import TextFeatures
from mugen.train.tasks import model_velocity_fn

LATENT_CHANNELS = 4
TEXT_DIM = 32
TEXT_TOKENS = 5
GLOBAL_BATCH = 4
# (latent frames, height, width) per step (cycled): N + 2 = 2*3*3 + 2 = 20, 3*2*2 + 2 = 14, 1*3*3 + 2 = 11
# tokens (odd: tensor parallelism pads it; context parallelism splits it unevenly)
STEP_SHAPES = [(2, 6, 6), (3, 4, 4), (1, 6, 6)]
STEP_CONDITIONED = [True, False, False]  # step 0: image-to-video samples with a clean first frame
LEARNING_RATE = 1e-3


def tiny_dit_config():
    return dit_config("debug", depth=2, text_dim=TEXT_DIM, latent_channels=LATENT_CHANNELS)


def tiny_dit() -> MUGDiT:
    torch.manual_seed(0)
    model = MUGDiT(tiny_dit_config())
    with torch.no_grad():  # zero-initialised heads would leave most gradients zero
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def step_batch(step: int) -> dict:
    """The global batch of a step, the same on every rank (identical noise and flow times)."""
    generator = torch.Generator().manual_seed(1000 + step)
    frames, height, width = STEP_SHAPES[step % len(STEP_SHAPES)]
    x0 = torch.randn(GLOBAL_BATCH, LATENT_CHANNELS, frames, height, width, generator=generator)
    text_mask = torch.ones(GLOBAL_BATCH, TEXT_TOKENS, dtype=torch.bool)
    text_mask[1::2, 3:] = False  # padded captions
    frame_cond_mask = None
    if STEP_CONDITIONED[step % len(STEP_SHAPES)]:
        frame_cond_mask = torch.zeros(GLOBAL_BATCH, frames, dtype=torch.bool)
        frame_cond_mask[::2, 0] = True
    return {
        "x0": x0,
        "states": torch.randn(GLOBAL_BATCH, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "text_mask": text_mask,
        "frame_cond_mask": frame_cond_mask,
        "t": torch.rand(GLOBAL_BATCH, generator=generator),
        "noise": torch.randn(x0.shape, generator=generator),
        "weights": torch.tensor([1.0, 0.3, 1.0, 1.0]),  # one image sample at the official 0.3
    }


def batch_loss(model, batch: dict, start: int, stop: int) -> torch.Tensor:
    """Mean flow loss of samples [start, stop) of the batch."""
    rows = slice(start, stop)
    text = TextFeatures(batch["states"][rows], batch["text_mask"][rows])
    mask = None if batch["frame_cond_mask"] is None else batch["frame_cond_mask"][rows]
    per_sample = flow_matching_loss(
        model_velocity_fn(model, text, None), batch["x0"][rows], batch["t"][rows], batch["noise"][rows], mask, batch["weights"][rows]
    )
    return per_sample.mean()


def full_value(tensor: torch.Tensor, name: str, fused_rows: dict) -> torch.Tensor:
    """A parameter or gradient as one plain tensor in the single-device layout."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    tensor = tensor.detach().clone()
    if name in fused_rows:
        tensor = canonical_rows(tensor, fused_rows[name])
    return tensor
