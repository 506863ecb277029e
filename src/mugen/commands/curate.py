"""`mugen curate`: raw videos -> training clips with scores, captions, tags and weights (seed §2.1).

    mugen curate --input DIR|LIST --output OUT [--workers N] [--executor local|ray] [--stages ...]
                 [--captions SIDECAR] [--vlm DIR] [--aesthetic-clip DIR --aesthetic-mlp FILE]
                 [--write-clips | --references] [--config curate.json]
    mugen curate {caption,tags,dedup,balance,report} --manifest OUT/manifest.parquet [...]

The first form runs the whole pipeline (or the `--stages` given) and writes `OUT/clips/`,
`OUT/manifest.parquet`, `OUT/rejections.parquet`, `OUT/tags.json` and `OUT/report.html`; killed
and restarted with the same arguments, it redoes no finished video. The second runs one stage
over an existing manifest and writes it back.
"""

from __future__ import annotations

import dataclasses

from mugen.errors import MugenError

MANIFEST_STAGE_HELP = {
    "caption": "caption the kept clips of a manifest (--vlm or --captions)",
    "tags": "extract subject/action/scene tags from the captions",
    "dedup": "mark near-duplicate clips (frame hashes + caption similarity)",
    "balance": "recompute the sampling weights from the tags",
    "report": "rewrite report.html from the manifest",
}


def _add_model_options(parser) -> None:
    parser.add_argument("--config", help="JSON file of settings by section: split, filter, clips, caption, tags, dedup, balance")
    parser.add_argument("--captions", help="caption sidecar: CSV or JSONL with 'caption' and clip_id/video/path (NAME.txt beside a video is always read)")
    parser.add_argument("--vlm", help="local Qwen2-VL model folder for captioning (transformers layout)")
    parser.add_argument("--tagger", choices=("keybert", "llm"), help="tag extractor (default keybert over the packaged MiniLM)")
    parser.add_argument("--tag-llm", help="local causal LM folder for --tagger llm")


def register(commands) -> None:
    parser = commands.add_parser(
        "curate",
        help="curate raw videos into training clips: split, filter, caption, tag, dedup, balance",
        description="Curate raw videos into training clips (seed §2.1). Without a stage name: the whole pipeline.",
    )
    parser.add_argument("--input", help="folder of videos (searched recursively) or a text file listing one video per line")
    parser.add_argument("--output", help="output folder: clips/, manifest.parquet, rejections.parquet, tags.json, report.html")
    parser.add_argument("--workers", type=int, default=1, help="parallel per-video workers (processes, or Ray CPUs)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local", help="local process pool or a Ray cluster")
    parser.add_argument("--ray-address", help="address of a running Ray cluster (default: start a local one)")
    parser.add_argument("--stages", help="comma-separated subset of probe,split,filter,caption,tags,dedup,balance (default: all)")
    parser.add_argument("--aesthetic-clip", help="local CLIP model folder for the aesthetic score")
    parser.add_argument("--aesthetic-mlp", help="LAION-style aesthetic MLP weights (.safetensors or .pth)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--write-clips", dest="references", action="store_false", help="write each kept clip as an H.264 MP4 (default)")
    output.add_argument("--references", dest="references", action="store_true", help="write no clip files: the manifest points into the sources")
    parser.add_argument("--max-clip-side", type=int, help="shrink written clips whose short side is larger than this (pixels)")
    _add_model_options(parser)
    parser.set_defaults(handler=run, references=None, curate_stage=None)

    stages = parser.add_subparsers(dest="curate_stage", metavar="STAGE")
    for name, help_text in MANIFEST_STAGE_HELP.items():
        stage_parser = stages.add_parser(name, help=help_text, description=help_text)
        stage_parser.add_argument("--manifest", required=True, help="manifest.parquet written by `mugen curate`")
        _add_model_options(stage_parser)
        stage_parser.set_defaults(handler=run)


def _config(args):
    from mugen.data.curation.pipeline import CurationConfig

    config = CurationConfig.from_json(args.config) if args.config else CurationConfig()
    if getattr(args, "tagger", None):
        config.tags = dataclasses.replace(config.tags, extractor=args.tagger)
    if getattr(args, "tag_llm", None):
        config.tags = dataclasses.replace(config.tags, llm_dir=args.tag_llm)
    if config.tags.extractor == "llm" and not config.tags.llm_dir:
        raise MugenError("--tagger llm needs --tag-llm DIR (a local causal language model folder)")
    return config


def run(args) -> int:
    from mugen.data.curation.pipeline import run_curation, run_manifest_stage

    config = _config(args)
    if args.curate_stage is not None:
        summary = run_manifest_stage(args.curate_stage, args.manifest, config, vlm_dir=args.vlm, captions_file=args.captions)
        print(f"curate {args.curate_stage}: " + ", ".join(f"{name} {value}" for name, value in summary.items()))
        return 0

    from mugen.data.curation.pipeline import parse_stages

    if not args.input or not args.output:
        raise MugenError("mugen curate needs --input DIR|LIST and --output DIR (or a stage name with --manifest)")
    if bool(args.aesthetic_clip) != bool(args.aesthetic_mlp):
        raise MugenError("the aesthetic score needs both --aesthetic-clip DIR and --aesthetic-mlp FILE")
    if args.aesthetic_clip:
        config.filter = dataclasses.replace(config.filter, aesthetic_clip_dir=args.aesthetic_clip, aesthetic_mlp_weights=args.aesthetic_mlp)
    if args.references is not None:
        config.clips = dataclasses.replace(config.clips, mode="references" if args.references else "write")
    if args.max_clip_side is not None:
        config.clips = dataclasses.replace(config.clips, max_short_side=args.max_clip_side)
    result = run_curation(
        args.input,
        args.output,
        config,
        stages=parse_stages(args.stages),
        executor=args.executor,
        workers=args.workers,
        ray_address=args.ray_address,
        vlm_dir=args.vlm,
        captions_file=args.captions,
    )
    print(
        f"curated {result.videos} videos ({result.videos_processed} processed now, {result.rejected_videos} rejected): "
        f"{result.clips} clips, {result.kept} kept -> {result.manifest}, report {result.report}"
    )
    return 0
