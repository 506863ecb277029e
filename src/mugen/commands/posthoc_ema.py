"""`mugen posthoc-ema`: combine a run's snapshots into one model after training (seed §4.2.3).

``--method ensemble`` is the report's exponentially decayed model ensembling of the raw snapshot
weights; ``--method power`` is EDM2's power-function post-hoc EMA, rebuilt from the power EMAs that
`mugen train dit --snapshot-every N` stores in every snapshot. The output folder loads like a run
folder (`mugen generate --checkpoint OUT`, `mugen train dit --init-from OUT`).
"""

from __future__ import annotations


def register(commands) -> None:
    parser = commands.add_parser("posthoc-ema", help="combine a run's snapshots by post-hoc EMA into a loadable model folder")
    parser.add_argument("--run", required=True, help="run folder of `mugen train dit --snapshot-every N` (holds snapshots/step_*)")
    parser.add_argument("--method", required=True, choices=("ensemble", "power"), help="ensemble: exponentially decayed weights (the report); power: EDM2 reconstruction")
    parser.add_argument("--half-life-steps", type=float, default=None, help="ensemble: a snapshot this many steps older counts half")
    parser.add_argument("--sigma-rel", type=float, default=None, help="power: relative width of the target EMA (EDM2 uses 0.05 to 0.2)")
    parser.add_argument("--target-step", type=int, default=None, help="power: step the target EMA is seen at (default: the newest snapshot)")
    parser.add_argument("--output", required=True, help="folder to write model_config.json, model.safetensors and posthoc_ema.json into")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mugen.train.posthoc_ema import posthoc_ema_from_run

    record = posthoc_ema_from_run(
        args.run,
        args.output,
        args.method,
        half_life_steps=args.half_life_steps,
        sigma_rel=args.sigma_rel,
        target_step=args.target_step,
    )
    weights = ", ".join(f"{w:.3f}" for w in record["weights"])
    print(f"wrote {args.output} ({args.method}: {len(record['weights'])} snapshot files, steps {sorted(set(record['steps']))}, weights [{weights}])")
    return 0
