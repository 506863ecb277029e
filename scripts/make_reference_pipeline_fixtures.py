"""Record what the official MUG-V image-to-video pipeline produces, for mugen's end-to-end parity test.

Runs the reference pipeline (``infer_pipeline.MUGDiTPipeline`` of a local Shopee-MUG/MUG-V checkout;
nothing of it is copied here) end to end on the CPU with small random models in the official
layouts, for a fixed seed, and saves its output video and intermediate latents (tensors only,
safetensors) plus a JSON description::

    # a checkout whose mug_v/dit/module.py calls torch SDPA instead of flash_attn / xformers
    # (see scripts/make_reference_dit_fixtures.py), and an environment with what it imports
    # (diffusers 0.29, accelerate, torchvision's transforms) outside mugen's own
    PYTHONPATH=src:<reference site-packages> python scripts/make_reference_pipeline_fixtures.py \
        --reference /tmp/mugv_ref --output tests/fixtures/reference_pipeline

Models (weights shared with the other parity fixtures, so nothing is stored twice):

* DiT: ``tests/fixtures/reference_dit/state_dict.safetensors`` (hidden 144 = 2 heads of 72, depth 2,
  text width 64), built by the reference's ``MUGDiT``;
* VAE: ``tests/fixtures/reference_vae/state_dict.safetensors`` (reduced widths, 48 -> 16 frame
  chunks), built by the reference's ``MUGVAE`` as ``scripts/make_reference_vae_fixtures.py`` does;
* T5: a tiny ``T5EncoderModel`` (d_model 64, 2 layers) and a word + letter Unigram tokenizer built
  here from seeds and saved in ``--output/t5`` (the reference loads it through its own ``T5`` class,
  with 300 tokens, in float32 as its pipeline does).

The request: a synthetic 80x45 reference image (so the bicubic cover-resize crops 8 columns),
frame size 40x56 (latents 5x7, padded to 6x8 inside the DiT), 33 frames (5 latents; the VAE
decodes 4 in two chunks), 4 sampling steps, guidance 4.0, seed 1234, fps 30, the release's
negative prompt and aesthetic suffix. The pipeline's frame-size and frame-count tables are
replaced by these values and its ``save_video`` by a function that keeps the tensor; everything
else runs as released. Runs once with ``dtype = float32`` and once with ``dtype = bfloat16``.

Outputs (in ``--output``):
    reference_image.png, t5/             the inputs
    reference_pipeline.safetensors       per dtype (``_fp32`` / ``_bf16``): ``video`` (3, 33, 40, 56)
                                         as the pipeline hands it to save_video, ``samples`` (the
                                         sampler's result), ``step_inputs`` (the latent state the DiT
                                         sees at each step, (steps, 1, 24, 5, 5, 7)),
                                         ``timesteps`` (steps,), ``image_latent``; and once the
                                         T5 ``text_states`` (2, 300, 64) and ``text_mask``
    reference_pipeline.json              the request, models, provenance
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
FRAME_SIZE = (40, 56)
NUM_FRAMES = 33
NUM_STEPS = 4
SEED = 1234
IMAGE_SIZE = (80, 45)  # width, height of the synthetic reference image
PROMPT = "a red car drives on the beach at sunset"
T5_WEIGHT_SEED = 5
T5_WORDS = (
    "a red car drives on the beach at sunset aesthetic score ugly blurry lowres bad anatomy hands text error "
    "missing fingers extra digit fewer digits cropped worst quality low normal jpeg artifacts signature "
    "watermark username"
).split()


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tiny_t5(folder: Path, d_model: int) -> None:
    """A T5 encoder of width ``d_model`` and a Unigram tokenizer: whole words, then single characters."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + word, -1.0 - 0.05 * index) for index, word in enumerate(dict.fromkeys(T5_WORDS))]
    vocab += [("\u2581", -4.0)] + [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789.,:"]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(folder)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )
    torch.manual_seed(T5_WEIGHT_SEED)
    T5EncoderModel(config).save_pretrained(folder)


def write_reference_image(path: Path) -> None:
    """Smooth colour gradients with a bright disc: structure that survives resizing."""
    from PIL import Image

    width, height = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 255 * x / (width - 1)
    green = 255 * y / (height - 1)
    blue = 128 + 100 * np.sin(x / 7.0) * np.cos(y / 5.0)
    disc = ((x - 0.6 * width) ** 2 + (y - 0.4 * height) ** 2) < (0.2 * height) ** 2
    pixels = np.stack([red, green, blue], axis=-1)
    pixels[disc] = [250, 240, 60]
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def run_reference(reference: Path, output: Path, dtype: torch.dtype, vae_fixture: Path) -> dict[str, torch.Tensor]:
    import infer_pipeline
    from mug_v.encoder import T5
    from mug_v.scheduler import RFlow

    dit_script = load_script("make_reference_dit_fixtures")
    vae_script = load_script("make_reference_vae_fixtures")
    ReferenceDiT = dit_script.import_reference(reference)
    dit = ReferenceDiT(**dit_script.REFERENCE_KWARGS).eval()
    dit.load_state_dict({k: v.float() for k, v in load_file(REPO / "tests/fixtures/reference_dit/state_dict.safetensors").items()}, strict=True)
    vae = vae_script.build_reference(reference)
    vae.load_state_dict({k: v.float() for k, v in load_file(vae_fixture / "state_dict.safetensors").items()}, strict=True)

    config = infer_pipeline.MUGDiTConfig()
    config.device, config.dtype, config.num_sampling_steps, config.seed = "cpu", dtype, NUM_STEPS, SEED
    pipeline = infer_pipeline.MUGDiTPipeline(config)
    pipeline.vae = vae.to(dtype).eval()
    pipeline.text_encoder = T5(from_pretrained=str(output / "t5"), max_model_len=300, device="cpu")
    pipeline.model = dit.to(dtype).eval()
    pipeline.scheduler = RFlow(num_sampling_steps=NUM_STEPS, cfg_scale=config.cfg_scale)

    record: dict[str, list | torch.Tensor] = {"step_inputs": [], "timesteps": []}
    forward = pipeline.model.forward

    def recording_forward(x, timestep, y, **kwargs):
        record["step_inputs"].append(x[:1].detach().float().clone())
        record["timesteps"].append(timestep[:1].detach().float().clone())
        return forward(x, timestep, y, **kwargs)

    pipeline.model.forward = recording_forward
    encode_text = pipeline.text_encoder.encode

    def recording_encode(text):
        result = encode_text(text)
        record["text_states"], record["text_mask"] = result["y"][:, 0].float().clone(), result["mask"].clone()
        return result

    pipeline.text_encoder.encode = recording_encode
    vae_encode = pipeline.vae.encode

    def recording_vae_encode(x):
        latent = vae_encode(x)
        record["image_latent"] = latent.float().clone()
        return latent

    pipeline.vae.encode = recording_vae_encode
    sample = pipeline.scheduler.sample

    def recording_sample(*args, **kwargs):
        samples = sample(*args, **kwargs)
        record["samples"] = samples.float().clone()
        return samples

    pipeline.scheduler.sample = recording_sample

    def keep_video(video, save_path=None, **_):
        record["video"] = video.clone()
        return str(save_path)

    infer_pipeline.save_video = keep_video
    infer_pipeline.get_frame_size = lambda *_: FRAME_SIZE
    infer_pipeline.get_num_frames = lambda *_: NUM_FRAMES
    pipeline.generate(prompt=PROMPT, reference_image_path=str(output / "reference_image.png"), output_path=str(output / "unused.mp4"), seed=SEED)
    record["step_inputs"] = torch.stack(record["step_inputs"])
    record["timesteps"] = torch.cat(record["timesteps"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, type=Path, help="checkout of Shopee-MUG/MUG-V with SDPA attention")
    parser.add_argument("--output", required=True, type=Path, help="folder for the fixture files")
    parser.add_argument("--vae-fixture", type=Path, default=REPO / "tests/fixtures/reference_vae", help="folder of the VAE parity fixture")
    args = parser.parse_args()
    reference = args.reference.resolve()
    if not (reference / "infer_pipeline.py").is_file():
        sys.exit(f"--reference {reference}: no infer_pipeline.py there; pass a checkout of Shopee-MUG/MUG-V")
    sys.path.insert(0, str(reference))
    args.output.mkdir(parents=True, exist_ok=True)
    dit_record = json.loads((REPO / "tests/fixtures/reference_dit/reference_dit.json").read_text())
    build_tiny_t5(args.output / "t5", d_model=dit_record["mugen_config"]["text_dim"])
    write_reference_image(args.output / "reference_image.png")

    tensors = {}
    for dtype, suffix in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        record = run_reference(reference, args.output, dtype, args.vae_fixture)
        video = record["video"]
        tensors[f"video_{suffix}"] = video.to(torch.float32 if dtype == torch.float32 else torch.bfloat16).contiguous()
        for name in ("samples", "step_inputs", "timesteps", "image_latent"):
            tensors[f"{name}_{suffix}"] = record[name].contiguous()
        tensors["text_states"], tensors["text_mask"] = record["text_states"].contiguous(), record["text_mask"].contiguous()
        print(f"{suffix}: video {tuple(video.shape)} {video.dtype}, samples {tuple(record['samples'].shape)}, timesteps {record['timesteps'].tolist()}")
    (args.output / "unused.mp4").unlink(missing_ok=True)
    save_file(tensors, str(args.output / "reference_pipeline.safetensors"), metadata={"format": "pt"})

    commit = subprocess.run(["git", "-C", str(reference), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = dict(
        reference=dict(repository="https://github.com/Shopee-MUG/MUG-V", commit=commit or None, pipeline="infer_pipeline.MUGDiTPipeline"),
        request=dict(
            prompt=PROMPT, seed=SEED, frame_size=list(FRAME_SIZE), num_frames=NUM_FRAMES, num_steps=NUM_STEPS,
            guidance_scale=4.0, fps=30, aesthetic_score=6.0, image="reference_image.png", image_size_wh=list(IMAGE_SIZE),
        ),
        models=dict(
            dit="tests/fixtures/reference_dit (state_dict.safetensors, mugen_config)",
            vae="tests/fixtures/reference_vae (state_dict.safetensors, mugen_config)",
            t5="t5/ (T5EncoderModel + tokenizer, run in float32 by both pipelines)",
        ),
        runs=dict(fp32="pipeline dtype float32 (DiT and VAE float32)", bf16="pipeline dtype bfloat16 (DiT and VAE cast to bf16, T5 float32), CPU"),
        tensors={name: list(value.shape) for name, value in tensors.items()},
        torch_version=torch.__version__,
    )
    (args.output / "reference_pipeline.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    total = sum(path.stat().st_size for path in args.output.rglob("*") if path.is_file())
    print(f"wrote {args.output} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
