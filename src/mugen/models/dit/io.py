"""Saving and finding MUG-DiT weights together with what is needed to rebuild the model.

A *run directory* (what ``mugen train dit`` writes) holds ``model_config.json``::

    {"dit": {...MUGDiTConfig...}, "preset": "debug", "text_encoder": "minilm", "vae": "/path/to/vae"}

and ``checkpoints/step_*/model.safetensors`` from the Trainer. ``resolve_dit_checkpoint`` accepts a
run directory, one of its step directories, or an exported directory (``model_config.json`` +
``model.safetensors``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mugen.atomic import write_text_atomically
from mugen.errors import MugenError
from mugen.models.dit.model import MUGDiT, MUGDiTConfig
from mugen.train.checkpoint import MODEL_FILE, latest_checkpoint, load_model_weights

RUN_CONFIG_FILE = "model_config.json"


def write_run_config(run_dir: str | os.PathLike, record: dict) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_text_atomically(run_dir / RUN_CONFIG_FILE, json.dumps(record, indent=2) + "\n")


def resolve_dit_checkpoint(path: str | os.PathLike) -> tuple[dict, Path]:
    """-> (run config record, path of model.safetensors)."""
    path = Path(path)
    if not path.exists():
        raise MugenError(f"checkpoint {path} does not exist; pass the folder `mugen train dit` wrote (its --output)")
    candidates = [path, path.parent.parent]  # a run/export dir, or a step dir inside checkpoints/
    record_path = next((c / RUN_CONFIG_FILE for c in candidates if (c / RUN_CONFIG_FILE).is_file()), None)
    if record_path is None:
        raise MugenError(f"checkpoint {path} has no {RUN_CONFIG_FILE}; pass a run folder written by `mugen train dit`")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if (path / MODEL_FILE).is_file():
        weights = path / MODEL_FILE
    else:
        step = latest_checkpoint(path)
        if step is None:
            raise MugenError(f"checkpoint {path} holds no saved step yet (checkpoints/step_*/{MODEL_FILE}); train first")
        weights = step / MODEL_FILE
    return record, weights


def load_dit(path: str | os.PathLike, device: str | torch.device = "cpu", preset: str | None = None) -> tuple[MUGDiT, dict]:
    """Build the model from the run's config and load its weights (shapes checked, clear errors)."""
    record, weights = resolve_dit_checkpoint(path)
    if preset is not None and record.get("preset") not in (None, preset):
        raise MugenError(
            f"checkpoint {path} was trained with preset {record.get('preset')!r}, not {preset!r}; "
            f"drop --preset or pass {record.get('preset')!r}"
        )
    model = MUGDiT(MUGDiTConfig.from_dict(record["dit"]))
    load_model_weights(model, weights)
    return model.to(device).eval(), record
