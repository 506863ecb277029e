"""Record what the official MUG-V VAE computes, for mugen's parity test (issue 3, item 2).

Imports the reference VAE from a local checkout of Shopee-MUG/MUG-V (nothing of it is copied
here), builds it at a reduced size that keeps the official layout, gives it seeded random weights,
runs encode and decode on fixed random inputs and saves tensors only (safetensors) plus a JSON
description::

    git --git-dir=<mirror of Shopee-MUG/MUG-V> archive HEAD | tar -x -C /tmp/mugv_ref
    # the reference's pins, beside (not in) mugen's environment; torch, numpy, einops come from it
    .venv/bin/python -m pip install --no-deps --target /tmp/mugv_site diffusers==0.29.0 \
        transformers==4.46.2 "tokenizers>=0.20,<0.21" "huggingface_hub<0.26" \
        requests urllib3 idna certifi charset_normalizer
    PYTHONPATH=src:/tmp/mugv_site .venv/bin/python scripts/make_reference_vae_fixtures.py \
        --reference /tmp/mugv_ref --output tests/fixtures/reference_vae

The reference VAE needs ``diffusers`` (its image autoencoder) and ``transformers`` (its config
class); no flash-attn or xformers. Two things are swapped while building it, both through the
reference module's own names, so that no download happens and the model is small:

* ``AutoencoderKL.from_pretrained("PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers")`` builds a fresh
  ``AutoencoderKL`` of the SDXL layout (4 DownEncoderBlock2D / UpDecoderBlock2D levels) with the
  reduced widths below, and the same ``use_quant_conv=False, use_post_quant_conv=False``;
* ``MUGVAETemporal`` gets the reduced ``in_out_channels`` (= the image widths' last entry),
  ``filters``, ``num_res_blocks`` and ``num_groups``; everything else as released (24 latent channels,
  multipliers (1, 2, 2, 4), temporal downsampling (True, True, True)).

``micro_frame_size`` is 16 (released: 48) so that a 33-frame clip spans three chunks (16, 16, 8)
and a 5-latent decode spans three (2, 2, 1), the last one short; ``micro_batch_size`` is the
released 4. Shift and scale are the released 24 values (``MUGVAE``'s defaults).

Weights are drawn on the bfloat16 grid (values exactly representable in bfloat16) and stored as
bfloat16: casting them to float32 gives bit for bit the float32 weights the reference ran with.
The input video too. ``shift``, ``scale`` and ``logvar`` are stored in float32.

Outputs (in ``--output``):
    state_dict.safetensors   the reference VAE's state dict (official names, as in vae.pt)
    cases.safetensors        inputs and outputs, float32 (``*_fp32``) and bfloat16 (``*_bf16``) runs
    reference_vae.json       reference kwargs, mugen's ReleasedVAEConfig, cases, provenance
    released_vae_state_dict.tsv   names and shapes of the reference VAE at the release's size
                                  (built on the meta device): the layout of the released vae.pt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

IMAGE_KWARGS = dict(  # diffusers AutoencoderKL kwargs: the SDXL VAE layout at reduced width/depth
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),  # released: (128, 256, 512, 512)
    layers_per_block=1,  # released: 2
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=8,  # released: 32
    sample_size=1024,
)
TEMPORAL_OVERRIDES = dict(filters=8, num_res_blocks=1, num_groups=4)  # released: 128, 4, 32
MICRO_FRAME_SIZE = 16  # released: 48
MICRO_BATCH_SIZE = 4  # released: 4
WEIGHT_SEED = 20251125
INPUT_SEED = 11
SAMPLE_SEED = 1234
VIDEO_SHAPE = (2, 3, 33, 16, 24)  # B, C, T = 1 + 8 * 4, H, W
FULL_DECODE_FRAMES = 37  # 5 latents -> chunks of (16, 16, 5) frames: the last drops 3 decoded frames
PIPELINE_DECODE_FRAMES = 32  # the release's call: latents[:, :, 1:] of sample 0, num_frames = 8k


def mugen_config() -> dict:
    """The same model as mugen's ReleasedVAEConfig fields."""
    return dict(
        image_block_channels=list(IMAGE_KWARGS["block_out_channels"]),
        image_layers_per_block=IMAGE_KWARGS["layers_per_block"],
        image_norm_groups=IMAGE_KWARGS["norm_num_groups"],
        image_latent_channels=IMAGE_KWARGS["latent_channels"],
        temporal_filters=TEMPORAL_OVERRIDES["filters"],
        temporal_res_blocks=TEMPORAL_OVERRIDES["num_res_blocks"],
        temporal_norm_groups=TEMPORAL_OVERRIDES["num_groups"],
        micro_frame_size=MICRO_FRAME_SIZE,
        micro_batch_size=MICRO_BATCH_SIZE,
    )


RELEASED_IMAGE_KWARGS = dict(IMAGE_KWARGS, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)


def build_reference(reference: Path, released_size: bool = False):
    """The reference MUGVAE built through its own constructor: reduced (default) or at the release's size."""
    if str(reference) not in sys.path:
        sys.path.insert(0, str(reference))
    import mug_v.encoder.vae.vae as reference_vae
    from mug_v.encoder.vae.vae2d import AutoencoderKL
    from mug_v.encoder.vae.vae_temporal import MUGVAETemporal

    image_kwargs = RELEASED_IMAGE_KWARGS if released_size else IMAGE_KWARGS

    def image_autoencoder(*_, use_quant_conv=True, use_post_quant_conv=True, **__):
        return AutoencoderKL(**image_kwargs, use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv)

    def reduced_temporal(**kwargs):
        kwargs.update(TEMPORAL_OVERRIDES, in_out_channels=IMAGE_KWARGS["block_out_channels"][-1])
        return MUGVAETemporal(**kwargs)

    reference_vae.AutoencoderKL = types.SimpleNamespace(from_pretrained=image_autoencoder)
    reference_vae.MUGVAETemporal = MUGVAETemporal if released_size else reduced_temporal
    if released_size:
        return reference_vae.MUGVAE()  # the release's micro sizes (4 frames, 48 frames)
    model = reference_vae.MUGVAE(micro_batch_size=MICRO_BATCH_SIZE, micro_frame_size=MICRO_FRAME_SIZE)
    return model.eval()


def write_released_layout(reference: Path, path: Path) -> None:
    """Names and shapes of the reference's state dict at the release's size: what vae.pt holds."""
    with torch.device("meta"):
        model = build_reference(reference, released_size=True)
    lines = [f"{name}\t{'x'.join(map(str, tensor.shape))}" for name, tensor in model.state_dict().items()]
    path.write_text("name\tshape\n" + "\n".join(lines) + "\n", encoding="utf-8")


def on_bfloat16_grid(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16).float()


def random_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight random and non-zero-mean where it matters (norm gains near 1), on the bf16 grid."""
    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    state = {}
    for name, tensor in model.state_dict().items():
        if name in ("shift", "scale", "logvar"):
            state[name] = tensor.detach().float().clone()  # the released statistics; logvar 4.0
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if tensor.ndim == 1 and "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.2 * noise  # GroupNorm gains
        elif tensor.ndim == 1:
            value = 0.1 * noise  # biases
        else:
            fan_in = tensor[0].numel()
            value = noise / fan_in**0.5
        state[name] = on_bfloat16_grid(value)
    return state


def run_cases(model, inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """encode (posterior mean and seeded sample), encode of an image, decode (full and pipeline call)."""
    import mug_v.encoder.vae.utils as reference_distributions

    model = model.to(dtype)
    video = inputs["video"].to(dtype)
    image_clip = inputs["image"][:, :, None].repeat(1, 1, 8, 1, 1).to(dtype)  # as get_reference_vae_latent
    outputs = {}
    with torch.no_grad():
        torch.manual_seed(SAMPLE_SEED)
        outputs["encode_sample"] = model.encode(video)
        sample = reference_distributions.DiagonalGaussianDistribution.sample
        reference_distributions.DiagonalGaussianDistribution.sample = reference_distributions.DiagonalGaussianDistribution.mode
        try:
            outputs["encode_mean"] = model.encode(video)
            outputs["encode_image_mean"] = model.encode(image_clip)
        finally:
            reference_distributions.DiagonalGaussianDistribution.sample = sample
        latents = inputs["latents"].to(dtype)
        outputs["decode_full"] = model.decode(latents, num_frames=FULL_DECODE_FRAMES)
        outputs["decode_pipeline"] = model.decode(latents[:1, :, 1:], num_frames=PIPELINE_DECODE_FRAMES)
    suffix = "fp32" if dtype == torch.float32 else "bf16"
    return {f"{name}_{suffix}": value.to(dtype).contiguous() for name, value in outputs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, type=Path, help="checkout of Shopee-MUG/MUG-V")
    parser.add_argument("--output", required=True, type=Path, help="fixture folder (tests/fixtures/reference_vae)")
    args = parser.parse_args()

    model = build_reference(args.reference)
    state = random_weights(model)
    model.load_state_dict(state, strict=True)

    generator = torch.Generator().manual_seed(INPUT_SEED)
    video = on_bfloat16_grid(torch.rand(VIDEO_SHAPE, generator=generator) * 2 - 1)
    image = on_bfloat16_grid(torch.rand(1, *VIDEO_SHAPE[1:2], *VIDEO_SHAPE[3:], generator=generator) * 2 - 1)
    inputs = {"video": video, "image": image}
    with torch.no_grad():
        torch.manual_seed(SAMPLE_SEED)
        sampled = model.encode(video)  # the latents the release would hand the DiT
    inputs["latents"] = sampled.float().contiguous()  # decode input, off the bf16 grid on purpose

    cases = dict(inputs)
    cases.update(run_cases(model, inputs, torch.float32))
    cases.update(run_cases(model, inputs, torch.bfloat16))
    model.float()

    args.output.mkdir(parents=True, exist_ok=True)
    write_released_layout(args.reference, args.output / "released_vae_state_dict.tsv")
    stored = {name: (t.to(torch.bfloat16) if name not in ("shift", "scale", "logvar") else t).contiguous() for name, t in state.items()}
    save_file(stored, str(args.output / "state_dict.safetensors"), metadata={"format": "pt"})
    cases_stored = {name: (t.to(torch.bfloat16) if name in ("video", "image") else t) for name, t in cases.items()}
    save_file(cases_stored, str(args.output / "cases.safetensors"), metadata={"format": "pt"})

    commit = subprocess.run(["git", "-C", str(args.reference), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    import diffusers

    record = {
        "reference": {
            "repository": "https://github.com/Shopee-MUG/MUG-V",
            "commit": commit or "34be017c8f675cd669392e10e83ce6b711d8e754 (archive export, no git metadata)",
            "model": "mug_v.encoder.vae.MUGVAE (MUGAutoencoderPipeline)",
            "image_autoencoder_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in IMAGE_KWARGS.items()},
            "temporal_overrides": TEMPORAL_OVERRIDES,
            "micro_frame_size": MICRO_FRAME_SIZE,
            "micro_batch_size": MICRO_BATCH_SIZE,
            "diffusers_version": diffusers.__version__,
        },
        "mugen_config": mugen_config(),
        "weights": {
            "file": "state_dict.safetensors",
            "stored_dtype": "bfloat16 (shift, scale, logvar: float32)",
            "note": "values lie on the bfloat16 grid; cast to float32 for the exact weights the reference ran with",
            "seed": WEIGHT_SEED,
        },
        "cases": {
            "file": "cases.safetensors",
            "input_seed": INPUT_SEED,
            "sample_seed": SAMPLE_SEED,
            "video": f"{list(VIDEO_SHAPE)} in [-1, 1], bf16 grid (stored bf16)",
            "image": "(1, 3, H, W) in [-1, 1]; encode_image_mean encodes it repeated 8 times as get_reference_vae_latent does",
            "latents": "reference encode(video) after torch.manual_seed(sample_seed): the decode input",
            "encode_sample": "encode(video) after torch.manual_seed(sample_seed) (the release samples the posterior)",
            "encode_mean": "encode(video) with the posterior's sample() answering its mean",
            "decode_full": f"decode(latents, num_frames={FULL_DECODE_FRAMES})",
            "decode_pipeline": f"decode(latents[:1, :, 1:], num_frames={PIPELINE_DECODE_FRAMES}) as infer_pipeline.py calls it",
            "bf16": "reference model cast to bfloat16 and inputs cast to bfloat16, run on the CPU",
        },
        "torch_version": torch.__version__,
    }
    (args.output / "reference_vae.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    sizes = {p.name: p.stat().st_size for p in args.output.iterdir()}
    print(json.dumps(sizes, indent=2))


if __name__ == "__main__":
    main()
