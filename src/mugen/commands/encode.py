"""`mugen encode`: videos and captions -> latents, text features and a manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

from mugen.commands.common import add_device, parse_size, resolve_device
from mugen.errors import MugenError


def register(commands) -> None:
    parser = commands.add_parser("encode", help="encode videos + captions into latents, text features and a manifest")
    parser.add_argument("--input", required=True, help="a folder of videos/images (captions in NAME.txt beside each) or a .csv/.jsonl with path,caption")
    parser.add_argument("--vae", required=True, help="a mugen VAE folder (config.json + model.safetensors, e.g. RUN/vae from `mugen train vae`) or the released MUG-V vae.pt")
    parser.add_argument("--output", required=True, help="output folder (latents/, text/, manifest.parquet)")
    parser.add_argument("--text-encoder", default="minilm", help="minilm (default, offline), t5:/local/dir, or precomputed:/dir")
    parser.add_argument("--num-frames", type=int, default=17, help="frames per clip, 1 + 8k (1 = images only)")
    parser.add_argument("--size", type=parse_size, default=(64, 64), help="clip size N or HxW, multiples of 16")
    parser.add_argument("--clips-per-video", type=int, default=1, help="evenly spaced clips cut from each video")
    parser.add_argument("--frame-stride", type=int, default=1, help="take every n-th frame")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_device(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mugen.data.encode import clips_from_sources, encode_samples, list_sources
    from mugen.models.text.base import build_text_encoder
    from mugen.models.vae.loading import load_vae

    from mugen.models.vae.frames import latent_frames_for

    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise MugenError(f"output {output} exists and is not empty; pass --overwrite or choose another folder")
    # Check everything that can be checked before anything is written.
    latent_frames_for(args.num_frames, "--num-frames")
    height, width = args.size
    if height % 16 or width % 16:
        raise MugenError(f"--size {height}x{width} is not divisible by 16 (8x VAE, 2x2 patches); use e.g. {max(16, height // 16 * 16)}x{max(16, width // 16 * 16)}")
    device = resolve_device(args.device)
    sources = list_sources(args.input)
    vae = load_vae(args.vae, device=device)  # mugen's VideoVAE or the released VAE
    text_encoder = build_text_encoder(args.text_encoder, device=device)
    if output.exists():
        shutil.rmtree(output)
    rejections: list[dict] = []
    samples = clips_from_sources(sources, args.num_frames, args.size, args.clips_per_video, args.frame_stride, rejections)
    try:
        manifest = encode_samples(samples, vae, text_encoder, output, device=device, rejections=rejections)
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)  # no half-written dataset is left behind
        raise
    print(f"wrote {manifest} ({len(rejections)} inputs skipped, see {output / 'rejections.jsonl'})")
    return 0
