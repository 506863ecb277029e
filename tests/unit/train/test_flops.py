"""The FLOP formula (DESIGN.md) against torch's own FlopCounterMode on a tiny MUG-DiT.

What FlopCounterMode counts differently, and how the tests account for it:
* CPU SDPA: ``aten._scaled_dot_product_flash_attention_for_cpu`` has no FLOP formula registered, so
  with the default backend FlopCounterMode silently counts 0 for attention. Under the MATH backend
  attention decomposes into counted ``bmm`` calls (QK^T and AV: 4N^2 d per block, as we count).
* Input layers: the patch embedder, the text embedder's first linear and the t/fps embedders' first
  linear see inputs that need no gradient, so their backward is one weight-gradient matmul (1x their
  forward), where the formula counts the usual 2x. On the 1B preset at 360p that is ~1e-4 of the step.
* Element-wise work (norms, modulation, RoPE, softmax) is counted by neither.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mugen.errors import MugenError
from mugen.models.dit import MUGDiT, dit_config
from mugen.train.flops import (
    DiTStepFlops,
    dit_forward_flops,
    dit_sequence_tokens,
    throughput_metrics,
)

INPUT_LAYERS = ("MUGDiT.x_embedder", "MUGDiT.y_embedder.y_proj.fc1", "MUGDiT.t_embedder.mlp.0", "MUGDiT.fps_embedder.mlp.0")


@pytest.fixture(scope="module")
def tiny_dit():
    torch.manual_seed(0)
    config = dit_config("debug")
    model = MUGDiT(config)
    for parameter in model.parameters():  # non-zero output head and cross-attn proj: every path carries gradient
        torch.nn.init.normal_(parameter, std=0.05)
    batch = {
        "latents": torch.randn(2, 24, 3, 8, 10),
        "timestep": torch.rand(2) * 1000,
        "text_states": torch.randn(2, 7, 384),
        "text_mask": torch.tensor([[True] * 7, [True] * 5 + [False] * 2]),
    }
    return config, model, batch


def _count(model, batch, backward: bool):
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(batch["latents"], batch["timestep"], batch["text_states"], batch["text_mask"])
        if backward:
            out.square().mean().backward()
    return counter


def test_forward_matches_flop_counter_exactly_under_math_attention(tiny_dit):
    config, model, batch = tiny_dit
    with sdpa_kernel(SDPBackend.MATH):
        counter = _count(model, batch, backward=False)
    formula = dit_forward_flops(config, dit_sequence_tokens(config, 3, 8, 10), text_tokens=7, batch_size=2)
    assert counter.get_total_flops() == pytest.approx(formula.forward, rel=1e-12)
    per_module = counter.get_flop_counts()
    for index in range(config.depth):
        assert sum(per_module[f"MUGDiT.blocks.{index}"].values()) == pytest.approx(formula.blocks / config.depth, rel=1e-12)
    assert sum(per_module["MUGDiT.final_layer"].values()) == pytest.approx(formula.final_layer, rel=1e-12)


def test_training_flops_match_flop_counter_up_to_input_layer_backward(tiny_dit):
    config, model, batch = tiny_dit
    with sdpa_kernel(SDPBackend.MATH):
        forward_only = _count(model, batch, backward=False).get_flop_counts()
        total = _count(model, batch, backward=True).get_total_flops()
    formula = dit_forward_flops(config, dit_sequence_tokens(config, 3, 8, 10), text_tokens=7, batch_size=2)
    # The input layers compute no input gradient: their backward is 1x forward, not 2x.
    no_input_grad = sum(sum(forward_only[name].values()) for name in INPUT_LAYERS)
    assert total + no_input_grad == pytest.approx(formula.training, rel=1e-12)
    # Stated margin of the formula against the counter on this tiny model: within 1.5% (it is ~1e-4 at scale).
    assert abs(formula.training - total) / total < 0.015
    assert formula.training > total


def test_default_cpu_attention_is_invisible_to_flop_counter(tiny_dit):
    config, model, batch = tiny_dit
    counted = _count(model, batch, backward=False).get_total_flops()
    formula = dit_forward_flops(config, dit_sequence_tokens(config, 3, 8, 10), text_tokens=7, batch_size=2)
    assert counted == pytest.approx(formula.forward - formula.self_attention - formula.cross_attention, rel=1e-12)


def test_paper_1b_step_matches_design_formula():
    """1B preset, 360p, 10 latent frames (N = 9,202), 300 text slots: the DESIGN.md block formula dominates."""
    config = dit_config("1B")
    tokens = dit_sequence_tokens(config, 10, 46, 80)
    assert tokens == 9202
    flops = dit_forward_flops(config, tokens, 300)
    d, n, m = 1152, 9202, 300
    design = 3 * 56 * (2 * n * 14 * d * d + 4 * m * d * d + 4 * n * n * d + 4 * n * m * d)
    assert 3 * flops.blocks == pytest.approx(design, rel=1e-12)
    # Embedders and final layer add well under 1% at this size.
    assert 0 < flops.training - design < 0.01 * design


def test_recompute_adds_one_forward_of_recomputed_blocks():
    config = dit_config("debug")
    counter = DiTStepFlops(config, recomputed_block_fraction=1.0)
    batch = {"latents": torch.zeros(3, 24, 2, 4, 6), "text_states": torch.zeros(3, 5, 384)}
    model_flops, hardware_flops = counter(batch)
    flops = dit_forward_flops(config, dit_sequence_tokens(config, 2, 4, 6), 5, 3)
    assert model_flops == pytest.approx(3 * flops.forward)
    assert hardware_flops == pytest.approx(3 * flops.forward + flops.blocks)
    with pytest.raises(MugenError):
        flops.hardware_training(1.5)


def test_throughput_metrics_mfu_only_with_a_peak():
    metrics = throughput_metrics(500e12, 500e12, 1.0, peak_tflops=1000.0)
    assert metrics == {"model_tflops": pytest.approx(500.0), "mfu": pytest.approx(0.5)}
    cpu = throughput_metrics(2e12, 2e12, 0.5, peak_tflops=None)
    assert cpu == {"model_tflops": pytest.approx(4.0)}
    recompute = throughput_metrics(3e12, 4e12, 1.0, peak_tflops=10.0)
    assert recompute["hardware_tflops"] == pytest.approx(4.0) and recompute["hfu"] == pytest.approx(0.4)


def test_datasheet_peak_by_device_name(monkeypatch):
    from mugen.train import flops

    monkeypatch.setattr(flops.torch.cuda, "is_available", lambda: True)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("Tesla T4", None)):
        monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device, name=name: name)
        assert flops.datasheet_peak_tflops("cuda") == peak
    assert flops.datasheet_peak_tflops("cpu") is None
