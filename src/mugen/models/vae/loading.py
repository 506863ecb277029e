"""One entry point for every VAE mugen can use: ``load_vae(path)``.

Two kinds, told apart by what ``path`` is:

* **mugen's Video VAE** (the report's design, the trainable default): a folder with
  ``config.json`` + ``model.safetensors`` (``VideoVAE.save_pretrained``, ``RUN/vae`` of
  ``mugen train vae``);
* **the MUG-V release's VAE**: the released ``vae.pt`` (or a ``.safetensors`` of the same state
  dict), or a folder holding ``vae.pt`` (e.g. ``MUG-V-inference/``). See
  ``mugen.models.vae.official``.

Both answer the interface of ``mugen.models.vae.frames`` (``encode_images``,
``encode_to_latents``, ``decode_from_latents``; clips of ``1 + 8k`` frames <-> ``1 + k`` latents of
24 normalised channels), so ``mugen encode``, ``mugen train dit --vae`` and ``mugen generate``
take either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

from mugen.errors import MugenError
from mugen.models.state_files import SAFETENSORS_SUFFIX, TORCH_SUFFIXES
from mugen.models.vae.official import ReleasedVideoVAE, load_released_vae

__all__ = ["RELEASED_VAE_FILE", "load_released_vae", "load_vae", "resolve_vae_path", "vae_kind"]

RELEASED_VAE_FILE = "vae.pt"
MUGEN_VAE_FILES = ("config.json", "model.safetensors")
ACCEPTED = (
    "a mugen VAE folder (config.json + model.safetensors, e.g. RUN/vae from `mugen train vae`), "
    "the released MUG-V vae.pt, or a folder holding vae.pt"
)

VAEKind = Literal["mugen", "released"]


def _safetensors_is_released(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise MugenError(f"VAE checkpoint {path} cannot be read ({error}); the file is truncated or damaged") from error
    return any(n.startswith("temporal_vae.") for n in names) and any(n.startswith("spatial_vae.module.") for n in names)


def resolve_vae_path(path: str | os.PathLike) -> tuple[VAEKind, Path]:
    """(kind, the path to load) for a VAE location, reading no weights (safetensors: only its names).

    MugenError when ``path`` is missing or is neither kind.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MugenError(f"VAE {path} does not exist; pass {ACCEPTED}")
    if path.is_dir():
        if all((path / name).is_file() for name in MUGEN_VAE_FILES):
            return "mugen", path
        if (path / RELEASED_VAE_FILE).is_file():
            return "released", path / RELEASED_VAE_FILE
        present = sorted(p.name for p in path.iterdir())[:8]
        raise MugenError(f"VAE folder {path} holds neither config.json + model.safetensors nor vae.pt (found {present}); pass {ACCEPTED}")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "released", path
    if suffix == SAFETENSORS_SUFFIX:
        if _safetensors_is_released(path):
            return "released", path
        if (path.parent / "config.json").is_file():
            raise MugenError(f"VAE {path} is the weights file of a mugen VAE; pass its folder {path.parent} instead")
        raise MugenError(f"VAE {path} holds neither the released VAE's names (spatial_vae.*, temporal_vae.*) nor a mugen VAE; pass {ACCEPTED}")
    raise MugenError(f"VAE {path} has suffix {suffix!r}; pass {ACCEPTED}")


def vae_kind(path: str | os.PathLike) -> VAEKind:
    """"mugen" or "released" for a VAE location (see ``resolve_vae_path``); reads no weights."""
    return resolve_vae_path(path)[0]


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """mugen's ``VideoVAE`` or the release's ``ReleasedVideoVAE`` from ``path``, in eval mode on ``device``.

    ``dtype`` casts the weights; None gives float32 for both kinds (the release runs its VAE in
    bfloat16: pass ``torch.bfloat16`` for that).
    """
    from mugen.models.vae.model import VideoVAE

    kind, resolved = resolve_vae_path(path)
    if kind == "mugen":
        model = VideoVAE.from_pretrained(resolved, device=device)
        return (model.to(dtype) if dtype is not None else model).eval()
    model: ReleasedVideoVAE = load_released_vae(resolved, device=device, dtype=dtype)
    if dtype is None:
        model = model.float()  # vae.pt may be stored in bfloat16; mugen's callers expect float32 by default
    return model
