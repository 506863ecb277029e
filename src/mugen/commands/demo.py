"""`mugen demo`: train a small VAE and DiT on bundled data, generate, and write a report."""

from __future__ import annotations

from dataclasses import replace


def register(commands) -> None:
    parser = commands.add_parser("demo", help="the whole chain on bundled data: VAE, encode, DiT, samples, report")
    parser.add_argument("--output", default="mugen_demo", help="output folder (report.md / report.html inside)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: ~15 min on 2 cores; cuda: a longer run")
    parser.add_argument("--dit-steps", type=int, default=None, help="override the DiT training steps")
    parser.add_argument("--vae-steps", type=int, default=None, help="override the VAE training steps")
    parser.add_argument("--text-encoder", default=None, help="minilm (default) or precomputed:DIR from `mugen text-features --prompts` with the demo captions")
    parser.add_argument("--write-prompts", default=None, help="only write the demo's captions to this file (one per line) and exit")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mugen.demo import DEMO_PRESETS, run_demo

    if args.write_prompts:
        from pathlib import Path

        from mugen.demo import demo_prompts

        Path(args.write_prompts).write_text("\n".join(demo_prompts()) + "\n", encoding="utf-8")
        print(f"wrote {args.write_prompts}")
        return 0
    config = DEMO_PRESETS[args.device]
    if args.text_encoder is not None:
        config = replace(config, text_encoder=args.text_encoder)
    if args.dit_steps is not None:
        config = replace(config, dit_steps=args.dit_steps)
    if args.vae_steps is not None:
        config = replace(config, vae_steps=args.vae_steps)
    report = run_demo(args.output, config)
    print(f"report: {report} (and {report.with_suffix('.html')})")
    return 0
