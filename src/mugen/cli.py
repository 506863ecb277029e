"""The `mugen` command: demo, encode, train, generate, convert, expand, text-features, curate.

User mistakes (``MugenError``) print one line and exit with status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mugen.errors import MugenError


def build_parser() -> argparse.ArgumentParser:
    from mugen.commands import convert, curate, demo, encode, expand, generate, plan, posthoc_ema, strategy_demo, text_features, train

    parser = argparse.ArgumentParser(prog="mugen", description="Train and run MUG-V-style video generation models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "--attention",
        default=None,
        metavar="BACKEND",
        help="attention backend for every model the command runs: auto (default; cuDNN on Hopper), default, cudnn, "
        "flash, efficient, math, or fa4 (FlashAttention-4, optional package); same as MUGEN_SDPA_BACKEND",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, strategy_demo, curate, encode, train, generate, convert, expand, text_features, plan, posthoc_ema):
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.attention is not None:
            from mugen.models.common.attention import set_sdpa_backend

            set_sdpa_backend(args.attention.strip().lower())
        return int(args.handler(args) or 0)
    except MugenError as error:
        print(f"mugen {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mugen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
