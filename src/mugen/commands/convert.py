"""`mugen convert`: export a trained MUG-DiT to the official release's file layouts.

``--to official`` writes a ``dit.pt`` that the official MUG-V code loads with
``torch.load(weights_only=True)`` + ``load_state_dict(strict=True)`` (same names, shapes, dtypes);
``--to safetensors`` writes the same tensors as one ``.safetensors`` file. Both load back into mugen
with ``mugen.models.dit.official.load_official_checkpoint``.
"""

from __future__ import annotations

from pathlib import Path

from mugen.errors import MugenError

FORMATS = {"official": (".pt", ".pth"), "safetensors": (".safetensors",)}
DTYPES = ("same", "float32", "bfloat16")


def register(commands) -> None:
    parser = commands.add_parser("convert", help="export a trained DiT as the official dit.pt or one .safetensors file")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="run folder of `mugen train dit` (or one of its step folders), or a step folder of a distributed checkpoint",
    )
    parser.add_argument("--to", required=True, choices=sorted(FORMATS), help="official (dit.pt) or safetensors")
    parser.add_argument("--output", required=True, help="file to write: .pt for official, .safetensors for safetensors")
    parser.add_argument("--dtype", default="same", choices=DTYPES, help="cast floating-point weights (default: keep)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from mugen.models.dit.io import load_dit
    from mugen.models.dit.official import describe_size, export_official_checkpoint, export_safetensors

    output = Path(args.output)
    suffixes = FORMATS[args.to]
    if output.suffix.lower() not in suffixes:
        raise MugenError(f"--output {output} must end in {' or '.join(suffixes)} for --to {args.to}")
    if output.is_dir():
        raise MugenError(f"--output {output} is a folder; give a file name, e.g. {output / ('dit' + suffixes[0])}")
    dtype = None if args.dtype == "same" else getattr(torch, args.dtype)
    if (Path(args.checkpoint) / ".metadata").is_file():  # a sharded checkpoint of parallel training
        from mugen.distributed.checkpoint import export_checkpoint

        path = export_checkpoint(args.checkpoint, output, dtype=dtype)
        print(f"wrote {path} ({args.to}) from the distributed checkpoint {args.checkpoint}")
        return 0
    model, record = load_dit(args.checkpoint)
    export = export_official_checkpoint if args.to == "official" else export_safetensors
    path = export(model, output, dtype=dtype)
    print(
        f"wrote {path} ({args.to}, {len(model.state_dict())} tensors, {model.num_parameters:,} parameters, "
        f"{describe_size(model.config)}; trained as preset {record.get('preset')!r})"
    )
    return 0
