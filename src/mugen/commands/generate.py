"""`mugen generate`: text-to-video, image-to-video, text+image-to-video from a trained run, or with
the official MUG-V 10B release (``--preset mugv-10b-i2v --weights DIR``)."""

from __future__ import annotations

from mugen.commands.common import add_device, parse_size, resolve_device
from mugen.errors import MugenError

RUN_DEFAULTS = dict(size=(64, 64), num_frames=17, seed=0)


def register(commands) -> None:
    from mugen.infer.release import RELEASE_ASPECT_RATIOS, RELEASE_DURATIONS, RELEASE_LAYOUT, RELEASE_PRESET, RELEASE_SEED

    parser = commands.add_parser(
        "generate",
        help="generate a video (T2V, I2V with --image, TI2V with both; or the official release with --preset mugv-10b-i2v)",
        epilog=f"--preset {RELEASE_PRESET} --weights DIR runs the official MUG-V 10B image-to-video release exactly as "
        f"its reference pipeline does (needs --image and --prompt); DIR holds:\n{RELEASE_LAYOUT}",
    )
    parser.add_argument("--checkpoint", default=None, help="run folder of `mugen train dit` (or one of its step folders)")
    parser.add_argument("--weights", default=None, help=f"with --preset {RELEASE_PRESET}: folder with dit.pt, vae.pt and t5-v1_1-xxl/")
    parser.add_argument("--use-ema", action="store_true", help="use the online EMA weights the run exported (CHECKPOINT/ema, `mugen train dit --ema-decay`)")
    parser.add_argument("--prompt", default=None, help="what the video shows (required unless --image is given)")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none; the release uses its own)")
    parser.add_argument("--image", default=None, help="first-frame image for image-to-video")
    ratios = ", ".join(f"{key} = {h}x{w}" for key, (h, w) in RELEASE_ASPECT_RATIOS.items())
    parser.add_argument("--aspect-ratio", default="9:16", help=f"release: height:width as the release names them ({ratios}; HxW pixels)")
    parser.add_argument("--duration", default="5", help=f"release: seconds, {' or '.join(str(s) for s in RELEASE_DURATIONS)} ({', '.join(f'{s} s = {n} frames' for s, n in RELEASE_DURATIONS.items())})")
    parser.add_argument("--num-frames", type=int, default=None, help="frames, 1 + 8k (default 17; with the release preset: a preview override of --duration)")
    parser.add_argument("--size", type=parse_size, default=None, help="N or HxW (default 64; with the release preset: a preview override of --aspect-ratio)")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate given to the model and written to the file (not for the release, which uses its own)")
    parser.add_argument("--steps", type=int, default=25, help="Euler steps")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--seed", type=int, default=None, help=f"noise seed (default 0; release {RELEASE_SEED})")
    parser.add_argument("--preset", default=None, help=f"expected DiT preset (checked against the checkpoint), or {RELEASE_PRESET}")
    parser.add_argument("--vae", default=None, help="VAE folder or released vae.pt (default: the one recorded in the run)")
    parser.add_argument("--t5-dtype", choices=("bf16", "fp32"), default=None, help="release: T5-XXL precision (default bf16 on GPU, fp32 on CPU; the reference runs fp32)")
    parser.add_argument("--output", required=True, help="output .mp4; a .png contact sheet is written beside it")
    add_device(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mugen.infer.release import RELEASE_PRESET

    if args.prompt is not None and not args.prompt.strip():
        raise MugenError("--prompt is empty; describe the video, or leave --prompt out and give --image")
    if not args.output.lower().endswith(".mp4"):
        raise MugenError(f"--output {args.output} must end in .mp4")
    if args.preset == RELEASE_PRESET:
        return run_release(args)
    if args.weights is not None:
        raise MugenError(f"--weights is for the official release; add --preset {RELEASE_PRESET} (or use --checkpoint for a mugen run)")
    if args.checkpoint is None:
        raise MugenError(f"give --checkpoint (a `mugen train dit` run) or --preset {RELEASE_PRESET} --weights DIR")
    if args.prompt is None and args.image is None:
        raise MugenError("give --prompt (text-to-video), --image (image-to-video) or both")
    return run_checkpoint(args)


def run_checkpoint(args) -> int:
    import torch

    from mugen.infer.pipeline import MugenVideoPipeline, save_generation

    device = resolve_device(args.device)
    checkpoint = args.checkpoint
    if args.use_ema:
        from pathlib import Path

        checkpoint = Path(args.checkpoint) / "ema"
        if not (checkpoint / "model.safetensors").is_file():
            raise MugenError(f"--use-ema: {checkpoint} holds no EMA weights; train with `mugen train dit --ema-decay D`")
    pipeline = MugenVideoPipeline.from_checkpoint(checkpoint, device=device, vae=args.vae, preset=args.preset)
    height, width = args.size or RUN_DEFAULTS["size"]
    seed = RUN_DEFAULTS["seed"] if args.seed is None else args.seed
    result = pipeline(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt or "",
        image=args.image,
        num_frames=args.num_frames or RUN_DEFAULTS["num_frames"],
        height=height,
        width=width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        fps=args.fps,
        generator=torch.Generator().manual_seed(seed),
        show_progress=True,
    )
    video, sheet = save_generation(result.frames[0], args.output, args.fps, label=args.prompt)
    print(f"wrote {video} and {sheet}")
    return 0


def run_release(args) -> int:
    """The official MUG-V 10B image-to-video release (mugen.infer.release)."""
    import time
    from pathlib import Path

    import torch

    from mugen.data.video_io import write_contact_sheet, write_video
    from mugen.infer.release import (
        RELEASE_CRF,
        RELEASE_FILE_FPS,
        RELEASE_PRESET,
        RELEASE_SEED,
        ReleasePipeline,
        release_frame_size,
        release_num_frames,
        release_weight_paths,
    )

    for flag, value in (("--checkpoint", args.checkpoint), ("--vae", args.vae), ("--negative-prompt", args.negative_prompt)):
        if value is not None:
            raise MugenError(f"{flag} does not apply to --preset {RELEASE_PRESET} (it uses the release's own DiT, VAE and negative prompt)")
    if args.weights is None:
        raise MugenError(f"--preset {RELEASE_PRESET} needs --weights DIR (the folder holding dit.pt, vae.pt and t5-v1_1-xxl/)")
    if args.image is None or args.prompt is None:
        raise MugenError(f"--preset {RELEASE_PRESET} is image-to-video guided by text: give both --image and --prompt")
    frame_size = args.size or release_frame_size(args.aspect_ratio)  # validates --aspect-ratio
    num_frames = args.num_frames or release_num_frames(args.duration)  # validates --duration
    if not Path(args.image).is_file():
        raise MugenError(f"--image {args.image} does not exist")
    release_weight_paths(args.weights)  # names every missing file before anything loads
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    t5_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.t5_dtype]
    seed = RELEASE_SEED if args.seed is None else args.seed

    if torch.device(device).type == "cuda":  # as the reference pipeline sets them (its float32 T5 runs in TF32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    pipeline = ReleasePipeline.from_weights(args.weights, device=device, dtype=dtype, t5_dtype=t5_dtype)
    text = pipeline.encode_text(args.prompt)
    pipeline.text_encoder = None  # T5 is done: free its memory before sampling
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    result = pipeline(
        image=args.image, text=text, seed=seed, num_steps=args.steps, guidance_scale=args.guidance,
        frame_size=frame_size, num_frames=num_frames, show_progress=True,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    video = write_video(output, result.video, fps=RELEASE_FILE_FPS, crf=RELEASE_CRF)
    sheet = write_contact_sheet(output.with_suffix(".png"), result.video, label=args.prompt)
    print(f"wrote {video} and {sheet} ({result.video.shape[1]} frames, seed {seed}, {time.perf_counter() - started:.0f} s)")
    return 0
