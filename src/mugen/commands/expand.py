"""`mugen expand`: grow a trained MUG-DiT's width by an integer factor (seed §4.2.1, eq. 2).

The output folder (``model_config.json`` + ``model.safetensors``) loads like any run folder, e.g.
as the starting weights of a new training run; the optimizer restarts fresh.
"""

from __future__ import annotations


def register(commands) -> None:
    from mugen.train.expansion import DEFAULT_PERTURBATION

    parser = commands.add_parser("expand", help="widen a trained DiT by an integer factor, keeping its outputs (2B -> 10B)")
    parser.add_argument("--checkpoint", required=True, help="run folder of `mugen train dit` (or one of its step folders), or a step folder of a sharded (distributed) checkpoint")
    parser.add_argument("--factor", required=True, type=int, help="width factor e >= 2 (hidden and heads times e)")
    parser.add_argument("--output", required=True, help="new folder to write model_config.json and model.safetensors into")
    parser.add_argument(
        "--perturbation",
        type=float,
        default=DEFAULT_PERTURBATION,
        help=f"noise std relative to each weight's std, breaks symmetry between copies (default {DEFAULT_PERTURBATION}; 0 = exact)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbation noise (default 0)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mugen.models.dit.io import load_dit
    from mugen.models.dit.official import describe_size
    from mugen.train.expansion import expand_checkpoint

    output = expand_checkpoint(args.checkpoint, args.output, args.factor, args.perturbation, args.seed)
    model, record = load_dit(output)
    print(
        f"wrote {output} (x{args.factor}: {model.num_parameters:,} parameters, {describe_size(model.config)}, "
        f"preset {record.get('preset')!r}, perturbation {args.perturbation}); train on with a fresh optimizer"
    )
    return 0
