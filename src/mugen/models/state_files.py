"""Reading released weight files (``dit.pt``, ``vae.pt``, or a ``.safetensors`` of the same state dict).

Both released files are plain ``{name: tensor}`` state dicts saved with ``torch.save``; they are read
with ``torch.load(weights_only=True, mmap=True)`` (a 10B file is paged in as the model copies it, not
read twice into RAM). Every way a file can be wrong becomes a ``MugenError`` that names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from mugen.errors import MugenError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


def read_state_dict_file(path: str | os.PathLike, what: str, expected: str, missing_hint: str, resave_hint: str, wrapper_hint: str) -> dict[str, Tensor]:
    """Read a torch or safetensors state dict onto the CPU.

    ``what`` names the file in messages ("DiT checkpoint"); ``expected`` says which suffixes are right;
    the hints say what to pass instead when the file is missing, pickles code, or wraps the state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise MugenError(f"{what} {path} does not exist; {missing_hint}")
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise MugenError(f"{what} {path} has suffix {suffix!r}; expected {expected}")
    try:
        if suffix == SAFETENSORS_SUFFIX:
            state_dict = load_file(str(path), device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise MugenError(
            f"{what} {path} cannot be read ({type(error).__name__}: {first_line}); the file is truncated or damaged, copy it again"
        ) from error
    except Exception as error:  # the weights-only unpickler refuses code objects with pickle's own errors
        raise MugenError(f"{what} {path} is not a plain tensor file ({type(error).__name__}); {resave_hint}") from error
    if not isinstance(state_dict, dict) or not all(isinstance(value, Tensor) for value in state_dict.values()):
        keys = list(state_dict)[:5] if isinstance(state_dict, dict) else type(state_dict).__name__
        raise MugenError(f"{what} {path} is not a plain {{name: tensor}} state dict (top level: {keys}); {wrapper_hint}")
    return state_dict


def state_dict_problems(state_dict: dict[str, Tensor], expected: dict[str, Tensor]) -> list[str]:
    """What keeps ``state_dict`` from loading strictly into a model with state ``expected``, one phrase per
    kind (shapes that differ, missing and unexpected names, three examples each); empty when it fits."""
    from mugen.train.checkpoint import state_dict_differences

    missing, unexpected, mismatched = state_dict_differences(state_dict, expected, label="file")
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shapes differ ({'; '.join(mismatched[:3])})")
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    return problems
