"""`mugen strategy-demo`: parameter expansion, Flow-DPO and Flow-KTO shown working on procedural clips."""

from __future__ import annotations

from dataclasses import replace


def register(commands) -> None:
    parser = commands.add_parser(
        "strategy-demo", help="training-strategy demonstrations (seed §4.2): expansion vs scratch, DPO, KTO"
    )
    parser.add_argument("--output", default="mugen_strategy_demo", help="output folder (report.md / report.html inside)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: a plumbing check; cuda: the demonstration")
    parser.add_argument("--preset", default=None, choices=["cpu", "cuda"], help="recipe (sizes, steps); default: the one named like --device")
    parser.add_argument("--text-encoder", default=None, help="minilm (default) or precomputed:DIR from `mugen text-features` with the demo captions")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any StrategyDemoConfig field (repeatable)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mugen.commands.demo import apply_overrides
    from mugen.strategy_demo import STRATEGY_PRESETS, run_strategy_demo

    config = replace(STRATEGY_PRESETS[args.preset or args.device], device=args.device)
    if args.text_encoder is not None:
        config = replace(config, text_encoder=args.text_encoder)
    config = apply_overrides(config, args.set)
    report = run_strategy_demo(args.output, config)
    print(f"report: {report} (and {report.with_suffix('.html')})")
    return 0
