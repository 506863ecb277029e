"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse

import torch

from mugen.errors import MugenError


def parse_size(text: str) -> tuple[int, int]:
    """'64' -> (64, 64); '360x640' -> (360, 640) (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must be N or HxW, e.g. 64 or 368x640") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be N or HxW with positive numbers")
    return parts[0], parts[1]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MugenError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    return name


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, help="cpu, cuda, cuda:N or auto (GPU if present)")
