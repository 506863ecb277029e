"""Atomic training checkpoints.

Layout::

    output_dir/checkpoints/
        step_00000500/
            model.safetensors     the model's state dict (contiguous CPU tensors)
            training_state.pt     optimizer, scheduler, sampler position, step, RNG states, config, ...
            meta.json             step, time, mugen version, file list (human-readable)
        latest                    text file naming the newest complete checkpoint, e.g. "step_00000500"

A checkpoint is written into a temporary directory next to its final place and renamed in one
``os.rename``, and ``latest`` is replaced with ``os.replace``: a crash at any point leaves either
the old checkpoint set or the new one, never a half-written step directory. One process writes
checkpoints into a directory at a time.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mugen import __version__
from mugen.atomic import write_text_atomically
from mugen.errors import MugenError

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_ALIASES_KEY = "mugen_aliases"  # safetensors metadata: {alias name: stored name} for tied tensors


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------------------- model weights
def _tensors_for_safetensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The model's state dict as contiguous CPU tensors that share no memory, plus tied aliases.

    safetensors refuses tensors that share storage. Names that are the very same view (tied
    weights) are stored once and recorded as aliases; other overlapping views are copied apart.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    first_name_of_view: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        view = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() > 0 and view in first_name_of_view:
            aliases[name] = first_name_of_view[view]
            continue
        first_name_of_view[view] = name
        tensors[name] = tensor

    names_by_storage: dict[tuple, list[str]] = defaultdict(list)
    for name, tensor in tensors.items():
        if tensor.numel() > 0:
            names_by_storage[(tensor.device, tensor.untyped_storage().data_ptr())].append(name)
    partially_shared = {name for names in names_by_storage.values() if len(names) > 1 for name in names}

    cpu_tensors = {}
    for name, tensor in tensors.items():
        tensor = tensor.to("cpu").contiguous()
        if name in partially_shared:
            tensor = tensor.clone()
        cpu_tensors[name] = tensor
    return cpu_tensors, aliases


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        state = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata() or {}
    for alias, stored in json.loads(metadata.get(_ALIASES_KEY, "{}")).items():
        state[alias] = state[stored]
    return state


def state_dict_differences(
    saved: dict[str, Tensor], expected: dict[str, Tensor], label: str = "saved"
) -> tuple[list[str], list[str], list[str]]:
    """(missing names, unexpected names, "name <label> (shape) vs model (shape)" for shape mismatches)."""
    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    mismatched = [
        f"{name} {label} {tuple(saved[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in expected
        if name in saved and saved[name].shape != expected[name].shape
    ]
    return missing, unexpected, mismatched


def load_model_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load ``model.safetensors`` (a file, or a checkpoint directory holding one) into ``model``.

    With ``strict`` every key must match both ways; shapes must always match.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise MugenError(f"load_model_weights: {path} does not exist; pass a checkpoint directory or a .safetensors file")
    try:
        saved = _read_safetensors(path)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise MugenError(f"load_model_weights: cannot read {path} ({error}); the file is damaged or not safetensors") from error

    expected = model.state_dict()
    missing, unexpected, mismatched = state_dict_differences(saved, expected)
    if mismatched:
        raise MugenError(
            f"load_model_weights: {len(mismatched)} tensors in {path} have other shapes than the model "
            f"({'; '.join(mismatched[:3])}); build the model with the config it was trained with"
        )
    if strict and (missing or unexpected):
        raise MugenError(
            f"load_model_weights: {path} does not match the model: missing {missing[:3]} ({len(missing)} in all), "
            f"unexpected {unexpected[:3]} ({len(unexpected)} in all); use the matching model config or strict=False"
        )
    model.load_state_dict({name: tensor for name, tensor in saved.items() if name in expected}, strict=False)


# ------------------------------------------------------------------------------------ RNG state
def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU and (if initialised) CUDA generator states, loadable with weights_only."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": bit_generator,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------- save and load
def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    training_state: dict,
    meta: dict | None = None,
    keep_checkpoints: int = 0,
) -> Path:
    """Write ``checkpoints/step_{step:08d}/`` atomically, point ``latest`` at it, prune old ones.

    ``keep_checkpoints`` > 0 keeps that many newest step directories; 0 keeps all.
    Returns the checkpoint directory.
    """
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final_dir = root / step_dir_name(step)
    temp_dir = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final_dir.name}-", dir=root))
    try:
        tensors, aliases = _tensors_for_safetensors(model)
        save_file(tensors, str(temp_dir / MODEL_FILE), metadata={_ALIASES_KEY: json.dumps(aliases)})
        torch.save(training_state, temp_dir / STATE_FILE)
        meta_record = {
            "step": step,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mugen_version": __version__,
            "files": [MODEL_FILE, STATE_FILE, META_FILE],
            "num_tensors": len(tensors),
            "tied_aliases": aliases,
            **(meta or {}),
        }
        (temp_dir / META_FILE).write_text(json.dumps(meta_record, indent=2, default=str) + "\n")
        for name in (MODEL_FILE, STATE_FILE, META_FILE):
            _fsync(temp_dir / name)
        if final_dir.exists():
            # Saving the same step again (e.g. a fresh run in an old directory): swap it out.
            stale_dir = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-{final_dir.name}-", dir=root))
            os.rename(final_dir, stale_dir / final_dir.name)
            os.rename(temp_dir, final_dir)
            shutil.rmtree(stale_dir, ignore_errors=True)
        else:
            os.rename(temp_dir, final_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    write_text_atomically(root / LATEST_FILE, final_dir.name + "\n", durable=True)
    if keep_checkpoints > 0:
        prune_checkpoints(output_dir, keep_checkpoints)
    return final_dir


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete step directories, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and all((child / name).is_file() for name in (MODEL_FILE, STATE_FILE)):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints (never the one ``latest`` names) and stale temp dirs."""
    root = checkpoints_dir(output_dir)
    latest = latest_checkpoint(output_dir)
    removed = []
    for path in list_checkpoints(output_dir)[: -keep if keep > 0 else None]:
        if latest is not None and path.resolve() == latest.resolve():
            continue
        shutil.rmtree(path)
        removed.append(path)
    for child in root.iterdir():
        # Left behind by a save that was killed; this process is the only writer.
        if child.name.startswith(_TMP_PREFIX):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    return removed


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``latest`` (or the newest complete one if ``latest`` is absent); None if none."""
    root = checkpoints_dir(output_dir)
    latest_file = root / LATEST_FILE
    if latest_file.is_file():
        name = latest_file.read_text().strip()
        path = root / name
        if not _STEP_DIR.match(name) or not (path / MODEL_FILE).is_file() or not (path / STATE_FILE).is_file():
            raise MugenError(
                f"latest_checkpoint: {latest_file} names {name!r}, which is not a complete checkpoint; "
                f"delete {latest_file} to fall back to the newest complete step directory"
            )
        return path
    complete = list_checkpoints(output_dir)
    return complete[-1] if complete else None


def load_checkpoint(
    checkpoint_dir: str | os.PathLike, model: nn.Module | None = None, strict: bool = True
) -> dict:
    """Load a checkpoint's weights into ``model`` (if given) and return its training state dict."""
    checkpoint_dir = Path(checkpoint_dir)
    state_path = checkpoint_dir / STATE_FILE
    if not state_path.is_file():
        raise MugenError(f"load_checkpoint: {state_path} does not exist; pass a directory like checkpoints/step_00000500")
    if model is not None:
        load_model_weights(model, checkpoint_dir / MODEL_FILE, strict=strict)
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise MugenError(f"load_checkpoint: cannot read {state_path} ({error}); the checkpoint is damaged") from error
