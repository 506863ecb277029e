"""`mugen plan`'s memory and time model: counts checked against the model and autograd, layouts' behaviour."""

import dataclasses

import pytest
import torch

from mugen.distributed.plan import (
    GIB,
    GPUS,
    Layout,
    Links,
    block_parameters,
    build_workload,
    estimate_memory,
    estimate_time,
    gpu_for_attention_backend,
    outside_parameters,
    parse_resolution,
    plan_layouts,
    saved_activation_bytes,
)
from mugen.errors import MugenError
from mugen.models.dit import MUGDiT, dit_config


@pytest.mark.parametrize("preset, overrides", [("debug", {}), ("1B", {"depth": 2}), ("10B", {"depth": 1})])
def test_parameter_counts_match_the_model(preset, overrides):
    config = dit_config(preset, **overrides)
    with torch.device("meta"):
        model = MUGDiT(config)
    assert block_parameters(config) == sum(p.numel() for p in model.blocks[0].parameters())
    assert block_parameters(config) * config.depth + outside_parameters(config) == model.num_parameters


def _saved_bytes(config, latent_frames, text_tokens):
    """Bytes autograd saves for backward in one bf16-autocast forward (each storage once)."""
    torch.manual_seed(0)
    model = MUGDiT(config)
    latents = torch.randn(1, 24, latent_frames, 8, 8)
    text = torch.randn(1, text_tokens, config.text_dim)
    saved = {}

    def pack(tensor):
        saved[(tensor.untyped_storage().data_ptr(), tensor.dtype)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(latents, torch.tensor([500.0]), text)
    return sum(saved.values())


@pytest.mark.parametrize("width, heads", [(144, 2), (192, 8)])
def test_activation_count_matches_what_autograd_saves(width, heads):
    """The per-block bytes per token of ``saved_activation_bytes`` equal what autograd keeps (CPU, bf16 autocast).

    One block's share is the difference between a 2-block and a 1-block model; its growth with the
    sequence (2 -> 4 latent frames, +32 tokens) and with the text (8 -> 24 tokens) gives the per-token terms.
    """
    configs = {depth: dit_config("debug", hidden_size=width, num_heads=heads, depth=depth, text_dim=32) for depth in (1, 2)}

    def block_bytes(frames, text_tokens):
        return _saved_bytes(configs[2], frames, text_tokens) - _saved_bytes(configs[1], frames, text_tokens)

    base = block_bytes(2, 8)
    per_token_measured = (block_bytes(4, 8) - base) / 32
    per_text_token_measured = (block_bytes(2, 24) - base) / 16
    config = configs[1]
    per_token = saved_activation_bytes(config, 1, 0)
    per_text_token = saved_activation_bytes(config, 0, 1)
    assert per_token == pytest.approx(per_token_measured, rel=0.01)
    assert per_text_token == pytest.approx(per_text_token_measured, rel=0.01)


@pytest.fixture(scope="module")
def workload_10b():
    return build_workload(dit_config("10B"), "720p", latent_frames=14, global_batch=64)


def test_sharding_divides_the_states_and_parallelism_the_activations(workload_10b):
    w = workload_10b
    replicated = estimate_memory(w, Layout(dp=8), micro_batches=8)
    sharded = estimate_memory(w, Layout(dp=8, fsdp=True), micro_batches=8)
    for name in ("parameters", "gradients", "optimizer"):
        assert getattr(sharded, name) == pytest.approx(getattr(replicated, name) / 8)
    assert sharded.compute_weights < replicated.compute_weights / 10  # two unsharded blocks, not the model
    context = estimate_memory(w, Layout(dp=4, cp=2), micro_batches=16)
    assert context.activations == pytest.approx(replicated.activations / 2, rel=1e-2)  # text k/v stay whole
    tensor = estimate_memory(w, Layout(dp=4, tp=2), micro_batches=16)
    assert replicated.activations / 2 < tensor.activations < replicated.activations / 1.8  # gathered inputs stay whole
    recompute = estimate_memory(w, Layout(dp=8, recompute=True), micro_batches=8)
    assert recompute.activations < replicated.activations / 10  # 56 fp32 block inputs + one rebuilt block
    # 1F1B: the first of 2 stages holds half the blocks for 2 micro-batches in flight.
    pipeline = estimate_memory(w, Layout(dp=4, pp=2), micro_batches=16)
    assert pipeline.activations == pytest.approx(replicated.activations, rel=1e-6)
    assert pipeline.parameters == pytest.approx(outside_share(w) + (replicated.parameters - outside_share(w)) / 2)


def outside_share(workload):
    return 4.0 * outside_parameters(workload.config)


def test_time_model_recompute_and_communication(workload_10b):
    w, gpu, links = workload_10b, GPUS["h100"], Links()
    plain = estimate_time(w, Layout(dp=8), 8, gpu, links)
    recompute = estimate_time(w, Layout(dp=8, recompute=True), 8, gpu, links)
    # Recompute adds one forward of the blocks: (3 + 1) / 3 of the block FLOPs.
    assert (recompute.matmul_s + recompute.attention_s) / (plain.matmul_s + plain.attention_s) == pytest.approx(4 / 3, rel=0.01)
    assert plain.tp_comm_s == 0 and estimate_time(w, Layout(dp=4, tp=2), 16, gpu, links).tp_comm_s > 0
    # The same data-parallel all-reduce is slower across nodes than inside one.
    inside = estimate_time(w, Layout(dp=8), 8, gpu, links).dp_comm_s
    across = estimate_time(w, Layout(dp=8), 8, gpu, dataclasses.replace(links, gpus_per_node=4)).dp_comm_s
    assert across == pytest.approx(inside * links.intra_node_gbps / links.inter_node_gbps)
    single = estimate_time(w, Layout(dp=1), 64, gpu, links)
    assert single.dp_comm_s == 0 and single.bubble_s == 0
    assert estimate_time(w, Layout(dp=4, pp=2), 16, gpu, links).bubble_s > 0


def test_the_attention_backend_sets_the_attention_rate(workload_10b):
    h100 = GPUS["h100"]
    assert gpu_for_attention_backend(h100, "cudnn") is h100 and gpu_for_attention_backend(h100, "auto") is h100
    fa4 = gpu_for_attention_backend(h100, "fa4")
    assert fa4.attention_tflops == 400.0 and fa4.matmul_tflops == h100.matmul_tflops and "FlashAttention-4" in fa4.source
    cudnn_time = estimate_time(workload_10b, Layout(dp=8), 8, h100, Links())
    fa4_time = estimate_time(workload_10b, Layout(dp=8), 8, fa4, Links())
    assert fa4_time.attention_s == pytest.approx(cudnn_time.attention_s * 330.0 / 400.0)
    assert fa4_time.matmul_s == cudnn_time.matmul_s and fa4_time.step_s < cudnn_time.step_s


def test_recommendation_is_the_fastest_layout_that_fits(workload_10b):
    result = plan_layouts(workload_10b, GPUS["h100"], 64)
    best = result.recommended
    assert best is not None and best.fits
    fitting = [c for c in result.candidates if c.fits]
    assert best.time.step_s == min(c.time.step_s for c in fitting)
    assert best.memory.peak / GIB <= result.usable_gib
    assert any(not c.fits for c in result.candidates)  # at 50k tokens most layouts without recompute do not fit
    names = {c.layout.name for c in result.candidates}
    assert {"dp64", "fsdp64", "fsdp64 +recompute", "fsdp8 tp8 +recompute", "fsdp16 cp4 +recompute"} <= names


def test_nothing_fits_is_reported_not_hidden():
    workload = build_workload(dit_config("18B"), "1080p", latent_frames=30, global_batch=1)
    assert plan_layouts(workload, GPUS["h100"], 1).recommended is None


def test_workload_tokens_from_resolution_and_duration():
    config = dit_config("1B")
    assert build_workload(config, "360p", latent_frames=10).sequence_tokens == 9202
    assert build_workload(config, "360p", frames=80).sequence_tokens == 9202
    assert build_workload(config, latent_shape=(14, 90, 160)).sequence_tokens == 50402
    assert parse_resolution("368x640") == (368, 640)
    with pytest.raises(MugenError, match="resolution"):
        parse_resolution("hd")
    with pytest.raises(MugenError, match="nodes"):
        plan_layouts(build_workload(config, "360p"), GPUS["h100"], 12)
