"""`mugen demo`: train a small VAE and DiT on bundled data, generate, and write a report."""

from __future__ import annotations

from dataclasses import replace


def register(commands) -> None:
    parser = commands.add_parser("demo", help="the whole chain on bundled data: VAE, encode, DiT, samples, report")
    parser.add_argument("--output", default="mugen_demo", help="output folder (report.md / report.html inside)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: a few minutes on 2 cores; cuda: the longer run")
    parser.add_argument("--preset", default=None, choices=["cpu", "cuda"], help="recipe (sizes, steps); default: the one named like --device")
    parser.add_argument("--dit-steps", type=int, default=None, help="override the DiT training steps")
    parser.add_argument("--vae-steps", type=int, default=None, help="override the VAE training steps")
    parser.add_argument("--text-encoder", default=None, help="minilm (default) or precomputed:DIR from `mugen text-features --prompts` with the demo captions")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any DemoConfig field, e.g. --set dit_steps=3000 (repeatable)")
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
    config = replace(DEMO_PRESETS[args.preset or args.device], device=args.device)
    if args.text_encoder is not None:
        config = replace(config, text_encoder=args.text_encoder)
    if args.dit_steps is not None:
        config = replace(config, dit_steps=args.dit_steps)
    if args.vae_steps is not None:
        config = replace(config, vae_steps=args.vae_steps)
    config = apply_overrides(config, args.set)
    report = run_demo(args.output, config)
    print(f"report: {report} (and {report.with_suffix('.html')})")
    return 0


def apply_overrides(config, assignments: list[str]):
    """FIELD=VALUE strings -> a new DemoConfig; values parsed as JSON when they parse."""
    import dataclasses
    import json

    from mugen.errors import MugenError

    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or name not in fields:
            raise MugenError(f"--set {assignment!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value
    return replace(config, **changes)
