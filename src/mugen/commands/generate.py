"""`mugen generate`: text-to-video, image-to-video, text+image-to-video from a trained run."""

from __future__ import annotations

from mugen.commands.common import add_device, parse_size, resolve_device
from mugen.errors import MugenError


def register(commands) -> None:
    parser = commands.add_parser("generate", help="generate a video (T2V, I2V with --image, TI2V with both)")
    parser.add_argument("--checkpoint", required=True, help="run folder of `mugen train dit` (or one of its step folders)")
    parser.add_argument("--use-ema", action="store_true", help="use the online EMA weights the run exported (CHECKPOINT/ema, `mugen train dit --ema-decay`)")
    parser.add_argument("--prompt", default=None, help="what the video shows (required unless --image is given)")
    parser.add_argument("--negative-prompt", default="", help="what to steer away from (classifier-free guidance)")
    parser.add_argument("--image", default=None, help="first-frame image for image-to-video")
    parser.add_argument("--num-frames", type=int, default=17, help="frames, 1 + 8k")
    parser.add_argument("--size", type=parse_size, default=(64, 64), help="N or HxW, multiples of 16")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate given to the model and written to the file")
    parser.add_argument("--steps", type=int, default=25, help="Euler steps")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--preset", default=None, help="expected DiT preset (checked against the checkpoint)")
    parser.add_argument("--vae", default=None, help="VAE folder (default: the one recorded in the run)")
    parser.add_argument("--output", required=True, help="output .mp4; a .png contact sheet is written beside it")
    add_device(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from mugen.infer.pipeline import MugenVideoPipeline, save_generation

    if args.prompt is not None and not args.prompt.strip():
        raise MugenError("--prompt is empty; describe the video, or leave --prompt out and give --image")
    if args.prompt is None and args.image is None:
        raise MugenError("give --prompt (text-to-video), --image (image-to-video) or both")
    if not args.output.lower().endswith(".mp4"):
        raise MugenError(f"--output {args.output} must end in .mp4")
    device = resolve_device(args.device)
    checkpoint = args.checkpoint
    if args.use_ema:
        from pathlib import Path

        checkpoint = Path(args.checkpoint) / "ema"
        if not (checkpoint / "model.safetensors").is_file():
            raise MugenError(f"--use-ema: {checkpoint} holds no EMA weights; train with `mugen train dit --ema-decay D`")
    pipeline = MugenVideoPipeline.from_checkpoint(checkpoint, device=device, vae=args.vae, preset=args.preset)
    height, width = args.size
    result = pipeline(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        image=args.image,
        num_frames=args.num_frames,
        height=height,
        width=width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        fps=args.fps,
        generator=torch.Generator().manual_seed(args.seed),
        show_progress=True,
    )
    video, sheet = save_generation(result.frames[0], args.output, args.fps, label=args.prompt)
    print(f"wrote {video} and {sheet}")
    return 0
