"""Model FLOPs of MUG-DiT and the TFLOP/s and MFU figures the Trainer logs (issue 5 item 6).

The count follows DESIGN.md. Per block and sample, forward::

    2N * 14d^2          qkv (6d^2) + self-attn proj (2d^2) + cross-attn q (2d^2) + proj (2d^2) + MLP (16d^2), per token x2
    + 4M * d^2          cross-attention k and v of the M text tokens
    + 4N^2 * d          bidirectional self-attention, QK^T and AV, counted in full (no causal halving)
    + 4NM * d           cross-attention scores and weighted sum

with N the tokens that pass through the blocks (video tokens plus the start and end tokens) and M the
text tokens as computed (padded slots included: the kernels process them). Outside the blocks the
patch embedder, the text embedder, the timestep/fps embedders with the shared ``t_block`` and the
final layer are counted too. Backward = 2x forward (one matmul for the input gradient, one for the
weight gradient). Element-wise work (norms, modulation, RoPE, softmax) is not counted, as is usual
for MFU.

*Model* FLOPs are what the model needs (fwd + bwd). *Hardware* FLOPs add what activation
recomputation re-executes: one extra forward of every recomputed block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mugen.errors import MugenError

# Dense bf16 datasheet peaks (TFLOP/s) by a substring of ``torch.cuda.get_device_name``, first match
# wins: MFU is reported against these (DESIGN.md). H100 and H200 SXM share the 989 TFLOP/s
# tensor-core peak; the PCIe and NVL boards run lower clocks.
DATASHEET_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
}
SCALAR_FREQUENCY_SIZE = 256  # width of the sinusoidal features of t and fps (ScalarEmbedder)


@dataclass(frozen=True)
class DiTFlops:
    """Forward FLOPs of one MUG-DiT pass over a batch, by part (divide by nothing: totals)."""

    block_linear: float  # depth * 2N * 14d^2
    cross_kv: float  # depth * 4M d^2
    self_attention: float  # depth * 4N^2 d
    cross_attention: float  # depth * 4NM d
    embedders: float  # patch embed + text embedder + t/fps embedders and t_block
    final_layer: float

    @property
    def blocks(self) -> float:
        return self.block_linear + self.cross_kv + self.self_attention + self.cross_attention

    @property
    def forward(self) -> float:
        return self.blocks + self.embedders + self.final_layer

    @property
    def matmul(self) -> float:
        """Forward FLOPs in dense matmuls (everything except the two attention products)."""
        return self.forward - self.self_attention - self.cross_attention

    @property
    def training(self) -> float:
        """Model FLOPs of forward + backward (backward = 2x forward)."""
        return 3.0 * self.forward

    def hardware_training(self, recomputed_block_fraction: float = 0.0) -> float:
        """FLOPs the GPU executes when ``recomputed_block_fraction`` of the blocks are recomputed."""
        if not 0.0 <= recomputed_block_fraction <= 1.0:
            raise MugenError(f"recomputed_block_fraction={recomputed_block_fraction} must be in [0, 1]")
        return self.training + recomputed_block_fraction * self.blocks


def dit_sequence_tokens(config, latent_frames: int, latent_height: int, latent_width: int) -> int:
    """Tokens through the blocks for latents (T, H, W): patches (padded up, as the model does) + start/end."""
    grid = [-(-size // patch) for size, patch in zip((latent_frames, latent_height, latent_width), config.patch_size)]
    return math.prod(grid) + 2


def dit_forward_flops(config, sequence_tokens: int, text_tokens: int, batch_size: int = 1) -> DiTFlops:
    """Forward FLOPs of MUG-DiT (``MUGDiTConfig``) on ``batch_size`` samples of N tokens and M text tokens."""
    if sequence_tokens < 3:
        raise MugenError(f"sequence_tokens={sequence_tokens}: a MUG-DiT sequence holds at least one patch plus start/end")
    if text_tokens < 1:
        raise MugenError(f"text_tokens={text_tokens} must be at least 1")
    d = float(config.hidden_size)
    n = float(sequence_tokens)
    m = float(text_tokens)
    depth = float(config.depth) * batch_size
    mlp_hidden = float(int(config.hidden_size * config.mlp_ratio))
    # 2N * 14d^2 for mlp_ratio 4; written out so other ratios count right: qkv 3, proj 1, q 1, proj 1.
    per_token_linear = 2.0 * (6.0 * d * d + 2.0 * d * mlp_hidden)
    patch_volume = float(math.prod(config.patch_size))
    video_tokens = n - 2.0
    patch_embed = 2.0 * video_tokens * config.latent_channels * patch_volume * d
    text_embed = 2.0 * m * (config.text_dim * d + d * d)
    # t, t = 0 and fps through a ScalarEmbedder each (256 -> d -> d), then t_block (d -> 6d) twice.
    scalar_embed = 3 * 2.0 * (SCALAR_FREQUENCY_SIZE * d + d * d) + 2 * 2.0 * d * 6.0 * d
    final = 2.0 * video_tokens * d * patch_volume * config.output_channels
    return DiTFlops(
        block_linear=depth * n * per_token_linear,
        cross_kv=depth * 4.0 * m * d * d,
        self_attention=depth * 4.0 * n * n * d,
        cross_attention=depth * 4.0 * n * m * d,
        embedders=batch_size * (patch_embed + text_embed + scalar_embed),
        final_layer=batch_size * final,
    )


class DiTStepFlops:
    """Per micro-batch FLOP counter for the Trainer: ``counter(batch) -> (model_flops, hardware_flops)``.

    Reads the latent shape (B, C, T, H, W) and the padded text length from a collated batch
    (``collate_latent_batch``). ``recomputed_block_fraction``: share of blocks under activation
    checkpointing (hardware FLOPs add their forward once more).
    """

    def __init__(self, config, recomputed_block_fraction: float = 0.0):
        self.config = config
        self.recomputed_block_fraction = float(recomputed_block_fraction)

    def __call__(self, batch: dict) -> tuple[float, float]:
        batch_size, _, frames, height, width = batch["latents"].shape
        text_tokens = int(batch["text_states"].shape[1])
        flops = dit_forward_flops(self.config, dit_sequence_tokens(self.config, frames, height, width), text_tokens, batch_size)
        return flops.training, flops.hardware_training(self.recomputed_block_fraction)


def datasheet_peak_tflops(device) -> float | None:
    """bf16 dense peak of a CUDA device from its name; None on the CPU or for an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in DATASHEET_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def throughput_metrics(model_flops: float, hardware_flops: float, seconds: float, peak_tflops: float | None) -> dict:
    """TFLOP/s per GPU (model and, if it differs, hardware) and MFU/HFU against ``peak_tflops``."""
    seconds = max(float(seconds), 1e-12)
    metrics = {"model_tflops": model_flops / seconds / 1e12}
    recomputing = hardware_flops > model_flops
    if recomputing:
        metrics["hardware_tflops"] = hardware_flops / seconds / 1e12
    if peak_tflops:
        metrics["mfu"] = metrics["model_tflops"] / peak_tflops
        if recomputing:
            metrics["hfu"] = metrics["hardware_tflops"] / peak_tflops
    return metrics
