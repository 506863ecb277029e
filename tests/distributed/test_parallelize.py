"""Parity of ``parallelize_dit`` with the single-process run (gloo on the CPU, fp32).

Every layout trains the tiny MUG-DiT for 3 AdamW steps (with gradient clipping) on the real flow
objective. Each data-parallel group takes its share of the global batch of 4 samples; the ranks of
one tensor-parallel group take the same samples, flow times and noise. The loss (averaged over the
global batch), every parameter's gradient, the gradient norm and the weights after the third
step must match the single-process run on the whole batch.

Tolerances (fp32): losses and gradient norms rtol 1e-5; gradients atol 2e-6 + rtol 1e-4; weights
atol 2e-5 + rtol 1e-4. Sharded and replicated runs sum the same products in another order
(reduce-scatter of per-rank partial sums, all-gathered row blocks), which moves the last bits of
fp32 (~1e-7 relative). AdamW divides each gradient element by its own running RMS, so an element
whose gradient is at the fp32 noise level (~1e-9) takes a step whose size depends on that noise:
weights can differ by a fraction of one step (lr = 1e-3); 2e-5 is 2% of a step (measured worst:
8.5e-6, dp_shard=4). Measured deviations are printed (pytest -s).
"""

from __future__ import annotations

import pytest
import torch
from launcher import run_distributed
from torch.distributed.tensor import DTensor

from mugen.distributed.mesh import ParallelConfig, build_mesh
from mugen.distributed.parallelize import clip_grad_norm_, data_parallel_rank, parallelize_dit
from mugen.distributed.tensor_parallel import FUSED_ROWS_ATTRIBUTE, canonical_rows
from mugen.flow.objective import flow_matching_loss
from mugen.models.dit.model import MUGDiT
from mugen.models.dit.presets import dit_config
from mugen.models.text.base import TextFeatures
from mugen.train.tasks import model_velocity_fn

LATENT_CHANNELS = 4
TEXT_DIM = 32
TEXT_TOKENS = 5
GLOBAL_BATCH = 4
# (latent frames, height, width) per step: N + 2 = 2*3*3 + 2 = 20, 3*2*2 + 2 = 14, 1*3*4 + 2 = 14 tokens
STEP_SHAPES = [(2, 6, 6), (3, 4, 4), (1, 6, 8)]
STEP_CONDITIONED = [True, False, False]  # step 0: image-to-video samples with a clean first frame
LEARNING_RATE = 1e-3
MAX_GRAD_NORM = 0.5
LOSS_RTOL = 1e-5
GRAD_ATOL, WEIGHT_ATOL, TENSOR_RTOL = 2e-6, 2e-5, 1e-4


def tiny_dit() -> MUGDiT:
    torch.manual_seed(0)
    model = MUGDiT(dit_config("debug", depth=2, text_dim=TEXT_DIM, latent_channels=LATENT_CHANNELS))
    with torch.no_grad():  # zero-initialised heads would leave most gradients zero
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def step_batch(step: int) -> dict:
    """The global batch of a step, the same on every rank (identical noise and flow times)."""
    generator = torch.Generator().manual_seed(1000 + step)
    frames, height, width = STEP_SHAPES[step]
    x0 = torch.randn(GLOBAL_BATCH, LATENT_CHANNELS, frames, height, width, generator=generator)
    text_mask = torch.ones(GLOBAL_BATCH, TEXT_TOKENS, dtype=torch.bool)
    text_mask[1::2, 3:] = False  # padded captions
    frame_cond_mask = None
    if STEP_CONDITIONED[step]:
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


def single_process_run() -> dict:
    model = tiny_dit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    losses, norms, grads = [], [], []
    for step in range(len(STEP_SHAPES)):
        optimizer.zero_grad()
        loss = batch_loss(model, step_batch(step), 0, GLOBAL_BATCH)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)))
        losses.append(float(loss.detach()))
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        optimizer.step()
    return {"losses": losses, "norms": norms, "grads": grads, "weights": dict(model.named_parameters())}


def parallel_run(rank: int, world_size: int, layout: dict) -> dict | None:
    config = ParallelConfig(param_dtype="fp32", **layout)
    mesh = build_mesh(config, device_type="cpu")
    model = parallelize_dit(tiny_dit(), mesh, config)
    fused_rows = getattr(model, FUSED_ROWS_ATTRIBUTE, {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    dp_index, dp_count = data_parallel_rank(mesh)
    share = GLOBAL_BATCH // dp_count
    losses, norms, grads = [], [], []
    for step in range(len(STEP_SHAPES)):
        optimizer.zero_grad()
        loss = batch_loss(model, step_batch(step), dp_index * share, (dp_index + 1) * share)
        loss.backward()  # FSDP averages the gradients over the data-parallel ranks
        norms.append(float(clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)))
        global_loss = loss.detach().clone()
        torch.distributed.all_reduce(global_loss)  # every rank: sum over dp groups x (tp ranks per group)
        losses.append(float(global_loss) / world_size)  # each dp group counted tp times, its loss is a mean over its share
        grads.append({name: full_value(p.grad, name, fused_rows) for name, p in model.named_parameters()})
        optimizer.step()
    weights = {name: full_value(p, name, fused_rows) for name, p in model.named_parameters()}
    if rank != 0:
        return None
    return {"losses": losses, "norms": norms, "grads": grads, "weights": weights}


@pytest.fixture(scope="module")
def reference() -> dict:
    return single_process_run()


def assert_matches(result: dict, reference: dict, label: str) -> None:
    torch.testing.assert_close(result["losses"], reference["losses"], rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(result["norms"], reference["norms"], rtol=LOSS_RTOL, atol=0)
    worst = 0.0
    for step, (grads, expected) in enumerate(zip(result["grads"], reference["grads"], strict=True)):
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], atol=GRAD_ATOL, rtol=TENSOR_RTOL, msg=lambda m: f"step {step} grad {name}: {m}")
            worst = max(worst, float((grad - expected[name]).abs().max()))
    for name, weight in result["weights"].items():
        torch.testing.assert_close(weight, expected_weight := reference["weights"][name].detach(), atol=WEIGHT_ATOL, rtol=TENSOR_RTOL, msg=lambda m: f"weight {name}: {m}")
        worst = max(worst, float((weight - expected_weight).abs().max()))
    print(f"{label}: losses {result['losses']}, largest gradient/weight deviation {worst:.2e}")


LAYOUTS = {
    "dp_replicate2": (2, {"dp_replicate": 2}),  # DP: full replicas (HSDP with shard groups of 1)
    "dp_shard2": (2, {"dp_shard": 2}),  # FSDP2
    "dp_shard4": (4, {"dp_shard": 4}),
    "tp2": (2, {"tp": 2}),  # tensor + sequence parallel
    "dp_shard2_tp2": (4, {"dp_shard": 2, "tp": 2}),
}


@pytest.mark.parametrize("label", list(LAYOUTS))
def test_parallel_training_matches_single_process(label, reference):
    world_size, layout = LAYOUTS[label]
    result = run_distributed(parallel_run, world_size, args=(layout,))[0]
    assert_matches(result, reference, label)
