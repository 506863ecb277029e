"""Memory and step-time estimates of MUG-DiT training layouts, and a recommendation (``mugen plan``).

For a model size, a sequence (latent shape -> tokens), a GPU type and a GPU count, every layout of
data parallel (replicated, ``ddp``, or sharded, ``fsdp``), tensor + sequence parallel (``tp``),
context parallel (``cp``) and pipeline parallel (``pp``), with and without activation
recomputation, is costed:

The report trained MUG-V 10B with TP + sequence parallelism inside a node, PP across nodes without
activation recomputation, and DP on top (seed §5.1); this estimate lets a user find such a layout for
their own model size and sequence length before renting the GPUs.

Memory per GPU (eager, bf16 autocast over fp32 master weights, AdamW, as the Trainer trains):
  * parameters 4 B, gradients 4 B, AdamW moments 8 B per parameter, divided by the GPUs that shard
    them (FSDP over the data-parallel group, TP, PP stages);
  * bf16 compute copies of the weights: autocast keeps one per weight for the backward pass
    (2 B per local parameter); under FSDP only about two blocks are unsharded at a time;
  * activations saved for backward, per block and token (``saved_activation_bytes``): counted from
    the tensors autograd saves for one MUG-DiT block under bf16 autocast (``saved_tensors_hooks``;
    ``tests/unit/distributed/test_plan.py`` re-counts them): 80 B per channel (eight fp32 and
    thirteen bf16 (N, d) tensors, the fused qkv output and two bf16 MLP hidden tensors) plus 20 B per
    head and 24 B of norm statistics. Recomputation keeps only each block's fp32 input (4d B per
    token) and rebuilds one block at a time in backward;
  * the backward working set: gradients of a block's input and output in fp32, the fused attention
    kernel's fp32 dq accumulator (the *attention workspace*; a non-fused kernel would need
    heads x N^2 scores, shown for comparison) and one block's weight gradients.
  Peak = static (parameters, moments, compute weights) + max(activations + working set, gradients):
  gradients of a step appear while its activations are being freed.

Step time per GPU: model FLOPs (``mugen.train.flops``) at rates measured on an H100 (matmul 772,
SDPA head dim 72 fwd+bwd 330 TFLOP/s with cuDNN; shared/GPU.md), element-wise traffic at the
measured copy bandwidth, plus communication at the stated link bandwidths: TP+SP all-gathers and
reduce-scatters (not overlapped), ring attention for CP (hidden behind attention up to its time),
FSDP all-gathers / reduce-scatters and DDP all-reduces (hidden behind compute up to its time), and
the 1F1B pipeline bubble ``(pp - 1) / (m + pp - 1)``. These are floors: the eager 1B step measured
722 ms against an estimate of ~350 ms (see ``benchmarks/results/plan_vs_measured.md``); the ranking
of layouts, not the absolute time, is what the estimate is for.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

from mugen.errors import MugenError
from mugen.train.flops import dit_forward_flops, dit_sequence_tokens

GIB = 2**30

# Saved-for-backward bytes of one MUG-DiT block per token, eager bf16 autocast, fp32 master weights
# (counted with torch.autograd.graph.saved_tensors_hooks; see the module docstring).
SAVED_BYTES_PER_CHANNEL = 80  # x 32 (8 fp32) + 26 (13 bf16) + 6 (qkv) + 16 (MLP hidden) per channel d
SAVED_BYTES_PER_HEAD = 20  # 5 fp32 per-head statistics: 2 attention logsumexps, 3 QK-norm rsqrt
SAVED_BYTES_PER_TOKEN = 24  # 6 fp32 LayerNorm statistics (mean, rstd of the three norms)
SAVED_TEXT_BYTES_PER_CHANNEL = 12  # per text token and block: text in bf16, k/v, k-norm input and output
SAVED_TEXT_BYTES_PER_HEAD = 4  # per text token and block: the k-norm rsqrt
SAVED_OUTSIDE_BYTES_PER_CHANNEL = 10.5  # per video token, outside the blocks: embed, final layer, RoPE
# Under TP + sequence parallelism the bf16 inputs of qkv, cross-attention q and fc1 are all-gathered
# to the full sequence and saved at full size (3 x 2d B); the rest is split over the TP group.
TP_GATHERED_BYTES_PER_CHANNEL = 6
ELEMENTWISE_TRAFFIC_FACTOR = 4  # activations written in forward, read in backward, their gradients written and read


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: float  # what torch sees as total memory
    peak_tflops: float  # datasheet dense bf16, the MFU denominator
    matmul_tflops: float  # measured bf16 GEMM rate
    attention_tflops: float  # measured SDPA head dim 72 fwd+bwd rate (cuDNN)
    memory_gbps: float  # element-wise bandwidth
    source: str


GPUS = {
    "h100": GPUSpec("H100 80GB HBM3", 79.6, 989.0, 772.0, 330.0, 2885.0, "rates measured on an H100 (shared/GPU.md)"),
    # Same GH100 compute: the H100 rates are assumed; bandwidth scaled by the datasheet HBM ratio 4.8 / 3.35.
    "h200": GPUSpec("H200 141GB HBM3e", 139.8, 989.0, 772.0, 330.0, 2885.0 * 4.8 / 3.35, "H100 rates assumed, HBM scaled by datasheet"),
}


# FlashAttention-4 (``--attention fa4``) fwd+bwd at head dim 72 on an H100: 402 TFLOP/s at the 10B block's shape,
# 403 at the 1B's, 383-394 at the 2B's (benchmarks/results/fa4_attention.md); cuDNN ran 307-326 in the same runs.
FA4_ATTENTION_TFLOPS = 400.0


def gpu_for_attention_backend(gpu: GPUSpec, backend: str) -> GPUSpec:
    """``gpu`` with the attention rate of the chosen SDPA backend (FlashAttention-4's for ``fa4``, else cuDNN's)."""
    if backend != "fa4":
        return gpu
    return replace(gpu, attention_tflops=FA4_ATTENTION_TFLOPS, source=f"{gpu.source}; attention: FlashAttention-4 rate measured on an H100")


@dataclass(frozen=True)
class Links:
    """Per-GPU bus bandwidths (GB/s) for collectives inside a node and across nodes (assumed, not measured)."""

    intra_node_gbps: float = 360.0  # NVLink 4 (900 GB/s bidirectional) at typical NCCL bus bandwidth
    inter_node_gbps: float = 45.0  # one 400 Gb/s NIC per GPU, ~90% efficiency
    gpus_per_node: int = 8


@dataclass(frozen=True)
class Workload:
    config: object  # MUGDiTConfig
    sequence_tokens: int  # N through the blocks (video tokens + start/end)
    text_tokens: int
    global_batch: int  # samples per optimizer step over all GPUs
    label: str = ""

    @property
    def parameters(self) -> int:
        return block_parameters(self.config) * self.config.depth + outside_parameters(self.config)


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    fsdp: bool = False
    recompute: bool = False

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.cp * self.pp

    @property
    def name(self) -> str:
        parts = [f"{'fsdp' if self.fsdp else 'dp'}{self.dp}"]
        parts += [f"{label}{size}" for label, size in (("tp", self.tp), ("cp", self.cp), ("pp", self.pp)) if size > 1]
        return " ".join(parts) + (" +recompute" if self.recompute else "")


@dataclass
class MemoryEstimate:
    parameters: float
    gradients: float
    optimizer: float
    compute_weights: float
    activations_per_block: float  # one micro-batch, as held (recompute: only the block input)
    activations: float  # all blocks and micro-batches in flight, plus outside the blocks
    attention_workspace: float  # fused kernel's fp32 dq accumulator
    working_set: float  # backward temporaries incl. the attention workspace
    unfused_attention_scores: float  # what a non-fused attention would hold (for comparison)

    @property
    def static(self) -> float:
        return self.parameters + self.optimizer + self.compute_weights

    @property
    def peak(self) -> float:
        return self.static + max(self.activations + self.working_set, self.gradients)


@dataclass
class TimeEstimate:
    matmul_s: float
    attention_s: float
    elementwise_s: float
    tp_comm_s: float
    cp_comm_exposed_s: float
    dp_comm_s: float
    dp_comm_exposed_s: float
    bubble_s: float
    step_s: float
    model_flops_per_gpu: float

    def mfu(self, peak_tflops: float) -> float:
        return self.model_flops_per_gpu / self.step_s / (peak_tflops * 1e12)


@dataclass
class Candidate:
    layout: Layout
    micro_batches: int
    memory: MemoryEstimate
    time: TimeEstimate
    fits: bool


@dataclass
class Plan:
    workload: Workload
    gpu: GPUSpec
    gpus: int
    links: Links
    usable_gib: float
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def recommended(self) -> Candidate | None:
        fitting = [c for c in self.candidates if c.fits]
        return min(fitting, key=lambda c: (c.time.step_s, c.memory.peak)) if fitting else None


# ------------------------------------------------------------------------------------ counts
def block_parameters(config) -> int:
    d = config.hidden_size
    hidden = int(d * config.mlp_ratio)
    head_dim = config.head_dim
    attention = 3 * d * d + 3 * d + d * d + d + 2 * head_dim  # qkv, proj, q/k norms
    cross = d * d + d + 2 * d * d + 2 * d + d * d + d + 2 * head_dim  # q, kv, proj, q/k norms
    return attention + cross + 2 * d + (d * hidden + hidden + hidden * d + d) + 6 * d  # cross LN affine, MLP, table


def outside_parameters(config) -> int:
    d = config.hidden_size
    patch = math.prod(config.patch_size)
    embed = config.latent_channels * patch * d + d
    scalar = 2 * (256 * d + d + d * d + d)
    text = config.text_dim * d + d + d * d + d
    final = d * patch * config.output_channels + patch * config.output_channels + 2 * d
    return embed + scalar + 6 * d * d + 6 * d + text + final + 2 * d  # + t_block, start/end tokens


def saved_activation_bytes(config, tokens: int, text_tokens: int) -> float:
    """Bytes one block saves for backward for one sample of ``tokens`` (eager, bf16 autocast)."""
    d = config.hidden_size
    per_token = SAVED_BYTES_PER_CHANNEL * d + SAVED_BYTES_PER_HEAD * config.num_heads + SAVED_BYTES_PER_TOKEN
    per_text_token = SAVED_TEXT_BYTES_PER_CHANNEL * d + SAVED_TEXT_BYTES_PER_HEAD * config.num_heads
    return tokens * per_token + text_tokens * per_text_token


def estimate_memory(workload: Workload, layout: Layout, micro_batches: int) -> MemoryEstimate:
    config = workload.config
    d, depth = config.hidden_size, config.depth
    model_shards = layout.tp * layout.pp
    block_params = block_parameters(config)
    local_params = block_params * depth / model_shards + outside_parameters(config)  # outside: replicated over TP/PP
    data_shards = layout.dp if layout.fsdp else 1
    parameters = 4.0 * local_params / data_shards
    gradients = 4.0 * local_params / data_shards
    optimizer = 8.0 * local_params / data_shards
    if layout.fsdp:
        compute_weights = 2.0 * 2.0 * block_params / layout.tp  # about two unsharded bf16 blocks at a time
    else:
        compute_weights = 2.0 * local_params

    tokens = workload.sequence_tokens / layout.cp  # CP splits the sequence
    per_block_full = saved_activation_bytes(config, tokens, workload.text_tokens)
    if layout.tp > 1:
        gathered = TP_GATHERED_BYTES_PER_CHANNEL * d * tokens
        per_block_full = (per_block_full - gathered) / layout.tp + gathered
    blocks_per_stage = depth // layout.pp
    in_flight = min(layout.pp, micro_batches)  # 1F1B: the first stage holds pp micro-batches
    outside = SAVED_OUTSIDE_BYTES_PER_CHANNEL * d * tokens
    if layout.recompute:
        per_block = 4.0 * d * tokens / layout.tp  # the block's fp32 input only
        activations = in_flight * blocks_per_stage * per_block + per_block_full + outside
    else:
        per_block = per_block_full
        activations = in_flight * blocks_per_stage * per_block + outside
    attention_workspace = 4.0 * d * tokens / layout.tp
    working_set = 2 * 4.0 * d * tokens + attention_workspace + 4.0 * block_params / layout.tp
    heads = config.num_heads // layout.tp
    scores = 2.0 * heads * tokens * workload.sequence_tokens
    return MemoryEstimate(
        parameters=parameters,
        gradients=gradients,
        optimizer=optimizer,
        compute_weights=compute_weights,
        activations_per_block=per_block,
        activations=activations,
        attention_workspace=attention_workspace,
        working_set=working_set,
        unfused_attention_scores=scores,
    )


def _ring_seconds(volume_bytes: float, group: int, gbps: float) -> float:
    """One ring all-gather or reduce-scatter of a tensor of ``volume_bytes`` in total."""
    return 0.0 if group <= 1 else (group - 1) / group * volume_bytes / (gbps * 1e9)


def _group_bandwidth(layout: Layout, dim: str, links: Links) -> float:
    """Mesh order (outer -> inner): pp, dp, cp, tp. A group stays in a node if its span fits one."""
    span = {"tp": layout.tp, "cp": layout.cp * layout.tp, "dp": layout.dp * layout.cp * layout.tp, "pp": layout.gpus}[dim]
    return links.intra_node_gbps if span <= links.gpus_per_node else links.inter_node_gbps


def estimate_time(workload: Workload, layout: Layout, micro_batches: int, gpu: GPUSpec, links: Links) -> TimeEstimate:
    config = workload.config
    d, depth = config.hidden_size, config.depth
    flops = dit_forward_flops(config, workload.sequence_tokens, workload.text_tokens)
    split = layout.tp * layout.cp * layout.pp
    recompute_forward = flops.blocks if layout.recompute else 0.0  # one more forward of every block
    attention = 3.0 * (flops.self_attention + flops.cross_attention)
    matmul = 3.0 * flops.matmul
    if layout.recompute:
        share = (flops.self_attention + flops.cross_attention) / flops.blocks
        attention += recompute_forward * share
        matmul += recompute_forward * (1 - share)
    matmul_s = matmul / split / (gpu.matmul_tflops * 1e12)
    attention_s = attention / split / (gpu.attention_tflops * 1e12)
    memory = estimate_memory(workload, replace(layout, recompute=False), micro_batches)
    traffic = ELEMENTWISE_TRAFFIC_FACTOR * memory.activations_per_block * (depth // layout.pp)
    elementwise_s = traffic * (1.5 if layout.recompute else 1.0) / (gpu.memory_gbps * 1e9)

    tokens = workload.sequence_tokens / layout.cp
    activation_bf16 = tokens * d * 2.0
    # TP + SP: per block, 3 all-gathers + 3 reduce-scatters forward, as many backward.
    tp_comm_s = depth / layout.pp * 12 * _ring_seconds(activation_bf16, layout.tp, _group_bandwidth(layout, "tp", links))
    # Ring attention: K and V chunks go round the CP group forward; K, V and their gradients backward.
    kv_bytes = 2 * activation_bf16 * layout.cp / layout.tp  # full-sequence K and V of this TP rank
    cp_comm_s = depth / layout.pp * 3 * _ring_seconds(kv_bytes, layout.cp, _group_bandwidth(layout, "cp", links))
    cp_comm_exposed_s = max(0.0, cp_comm_s - attention_s)

    micro_s = matmul_s + attention_s + elementwise_s + tp_comm_s + cp_comm_exposed_s  # one micro-batch on one stage
    local_params = (block_parameters(config) * depth / (layout.tp * layout.pp)) + outside_parameters(config)
    dp_bandwidth = _group_bandwidth(layout, "dp", links)
    if layout.dp > 1 and layout.fsdp:
        gathers = micro_batches * 2 * _ring_seconds(2.0 * local_params, layout.dp, dp_bandwidth)  # bf16, fwd + bwd
        dp_comm_s = gathers + _ring_seconds(4.0 * local_params, layout.dp, dp_bandwidth)  # fp32 reduce-scatter
        hidden_behind = micro_batches * micro_s
    elif layout.dp > 1:
        dp_comm_s = 2 * _ring_seconds(4.0 * local_params, layout.dp, dp_bandwidth)  # fp32 all-reduce
        hidden_behind = micro_s * 2.0 / 3.0  # the last micro-batch's backward
    else:
        dp_comm_s, hidden_behind = 0.0, 0.0
    dp_comm_exposed_s = max(0.0, dp_comm_s - hidden_behind)

    compute_s = micro_batches * micro_s
    bubble_s = (layout.pp - 1) * micro_s
    # Point-to-point activations between stages (fp32 residual, fwd and bwd), not overlapped.
    p2p_s = 0.0 if layout.pp == 1 else 2 * micro_batches * tokens * d * 4.0 / layout.tp / (_group_bandwidth(layout, "pp", links) * 1e9)
    step_s = compute_s + bubble_s + dp_comm_exposed_s + p2p_s
    model_flops_per_gpu = flops.training * workload.global_batch / layout.gpus
    return TimeEstimate(
        matmul_s=micro_batches * matmul_s,
        attention_s=micro_batches * attention_s,
        elementwise_s=micro_batches * elementwise_s,
        tp_comm_s=micro_batches * tp_comm_s,
        cp_comm_exposed_s=micro_batches * cp_comm_exposed_s,
        dp_comm_s=dp_comm_s,
        dp_comm_exposed_s=dp_comm_exposed_s,
        bubble_s=bubble_s + p2p_s,
        step_s=step_s,
        model_flops_per_gpu=model_flops_per_gpu,
    )


# ---------------------------------------------------------------------------------- the plan
def _powers_of_two(limit: int) -> list[int]:
    return [2**k for k in range(int(math.log2(max(limit, 1))) + 1)]


def candidate_layouts(workload: Workload, gpus: int, links: Links) -> list[Layout]:
    """Every power-of-two TP/CP (inside a node), PP (dividing the depth) and DP filling ``gpus``."""
    config = workload.config
    layouts = []
    for tp, cp, pp in itertools.product(_powers_of_two(links.gpus_per_node), repeat=3):
        if tp * cp > links.gpus_per_node or gpus % (tp * cp * pp):
            continue
        if config.num_heads % tp or config.depth % pp:
            continue
        dp = gpus // (tp * cp * pp)
        if workload.global_batch % dp:
            continue
        for fsdp, recompute in itertools.product((False, True), repeat=2):
            if fsdp and dp == 1:
                continue
            layouts.append(Layout(dp=dp, tp=tp, cp=cp, pp=pp, fsdp=fsdp, recompute=recompute))
    return layouts


def plan_layouts(
    workload: Workload,
    gpu: GPUSpec,
    gpus: int,
    links: Links | None = None,
    reserve_gib: float = 3.0,
    layouts: list[Layout] | None = None,
) -> Plan:
    """Cost every candidate layout; ``reserve_gib`` is left for the CUDA context and fragmentation."""
    links = links or Links()
    if gpus < 1:
        raise MugenError(f"--gpus {gpus} must be at least 1")
    if workload.global_batch < 1:
        raise MugenError(f"--global-batch {workload.global_batch} must be at least 1")
    if gpus > links.gpus_per_node and gpus % links.gpus_per_node:
        raise MugenError(f"--gpus {gpus} is not a whole number of {links.gpus_per_node}-GPU nodes; use a multiple")
    result = Plan(workload, gpu, gpus, links, usable_gib=gpu.memory_gib - reserve_gib)
    for layout in layouts if layouts is not None else candidate_layouts(workload, gpus, links):
        micro_batches = workload.global_batch // layout.dp
        memory = estimate_memory(workload, layout, micro_batches)
        timing = estimate_time(workload, layout, micro_batches, gpu, links)
        result.candidates.append(Candidate(layout, micro_batches, memory, timing, memory.peak / GIB <= result.usable_gib))
    if not result.candidates:
        raise MugenError(
            f"no layout of {gpus} GPUs divides a global batch of {workload.global_batch}; "
            "pass --global-batch as a multiple of the data-parallel size (e.g. the number of GPUs)"
        )
    result.candidates.sort(key=lambda c: (not c.fits, c.time.step_s, c.memory.peak))
    return result


# ------------------------------------------------------------------------------- the workload
RESOLUTIONS = {"240p": (240, 426), "360p": (360, 640), "480p": (480, 848), "540p": (540, 960), "720p": (720, 1280), "1080p": (1080, 1920)}


def parse_resolution(text: str) -> tuple[int, int]:
    """'720p' or 'HxW' (pixels) -> (height, width)."""
    text = text.strip().lower()
    if text in RESOLUTIONS:
        return RESOLUTIONS[text]
    try:
        height, width = (int(part) for part in text.split("x"))
    except ValueError:
        raise MugenError(f"resolution {text!r}: use one of {', '.join(RESOLUTIONS)} or HxW in pixels, e.g. 368x640") from None
    if height <= 0 or width <= 0:
        raise MugenError(f"resolution {text!r}: height and width must be positive")
    return height, width


def build_workload(
    config,
    resolution: str = "360p",
    frames: int | None = None,
    latent_frames: int | None = None,
    latent_shape: tuple[int, int, int] | None = None,
    text_tokens: int = 300,
    global_batch: int = 1,
    spatial_factor: int = 8,
    temporal_factor: int = 8,
) -> Workload:
    """Tokens of one sample from a resolution and a duration (frames, or latent frames), or a latent shape."""
    if latent_shape is not None:
        latent_t, latent_h, latent_w = latent_shape
        label = f"latents {latent_t}x{latent_h}x{latent_w}"
    else:
        height, width = parse_resolution(resolution)
        if latent_frames is None:
            latent_frames = -(-int(frames) // temporal_factor) if frames else 10
        latent_t, latent_h, latent_w = latent_frames, -(-height // spatial_factor), -(-width // spatial_factor)
        label = f"{height}x{width}, {latent_t} latent frames"
    if min(latent_t, latent_h, latent_w) < 1:
        raise MugenError(f"latent shape {(latent_t, latent_h, latent_w)} must be positive in every axis")
    tokens = dit_sequence_tokens(config, latent_t, latent_h, latent_w)
    return Workload(config, tokens, text_tokens, global_batch, f"{label} (N = {tokens:,})")
