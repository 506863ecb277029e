"""Datasets for training: VAE latents + text features (MUG-DiT), and raw clips (Video VAE).

The DiT trains on pre-encoded data (seed §5.2: I/O is kept off the critical path): each sample is a
latent file `{"latents": (24, t, h, w)}` and a text-feature file, listed in a manifest. Every
sample's shape is known from the manifest, so a sampler can bucket by shape without opening files;
`collate_latent_batch` then stacks one bucket and pads captions to the longest in the batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

from mugen.data import write_atomically
from mugen.data.manifest import ManifestRow, read_manifest
from mugen.errors import MugenError

LATENT_KEY = "latents"


def save_latent(path: str | os.PathLike, latents: Tensor) -> None:
    """Write one sample's latents (C, t, h, w) to a safetensors file `{"latents": ...}`, atomically."""
    path = Path(path)
    if latents.dim() != 4:
        raise MugenError(f"cannot save latents to '{path}': expected (channels, t, h, w), got {tuple(latents.shape)}")
    tensor = latents.detach().cpu().contiguous()
    write_atomically(path, lambda temporary: save_file({LATENT_KEY: tensor}, str(temporary)))


def _corrupt(path: Path, reason: str) -> MugenError:
    first_line = reason.strip().splitlines()[0] if reason.strip() else "unknown reason"
    return MugenError(f"latent file '{path}' is unreadable or corrupt ({first_line}); re-run `mugen encode`")


def _as_sample_latents(value, path: Path) -> Tensor:
    """Accept (C, t, h, w) or a batch of one (1, C, t, h, w) from an official `.pt` file."""
    if isinstance(value, dict):
        if LATENT_KEY not in value:
            raise _corrupt(path, f"no '{LATENT_KEY}' entry; it holds {sorted(value)}")
        value = value[LATENT_KEY]
    if not isinstance(value, Tensor):
        raise _corrupt(path, f"it holds a {type(value).__name__}, not a tensor")
    if value.dim() == 5 and value.shape[0] == 1:
        value = value[0]
    if value.dim() != 4:
        raise _corrupt(path, f"latents have shape {tuple(value.shape)}, expected (channels, t, h, w)")
    return value


def _read_safetensors_entry(path: Path, read: Callable):
    """Open a latent safetensors file and return `read(handle)`; bad files become MugenErrors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            if LATENT_KEY not in handle.keys():
                raise _corrupt(path, f"no '{LATENT_KEY}' entry; it holds {sorted(handle.keys())}")
            return read(handle)
    except (SafetensorError, OSError, ValueError) as error:
        raise _corrupt(path, str(error)) from None


def load_latent(path: str | os.PathLike) -> Tensor:
    """Read one sample's latents (C, t, h, w) from safetensors, or from an official `.pt` tensor."""
    path = Path(path)
    if not path.is_file():
        raise MugenError(f"latent file '{path}' not found; check the manifest or re-run `mugen encode`")
    if path.suffix.lower() == ".pt":
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many kinds (pickle, zip, runtime) on bad files
            raise _corrupt(path, f"{type(error).__name__}: {error}") from None
    else:
        value = _read_safetensors_entry(path, lambda handle: handle.get_tensor(LATENT_KEY))
    return _as_sample_latents(value, path)


def latent_shape(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """(C, t, h, w) of a latent file, read from the safetensors header without loading the data."""
    path = Path(path)
    if path.suffix.lower() == ".pt" or not path.is_file():
        return tuple(load_latent(path).shape)  # .pt has no header to peek at; load_latent reports errors
    shape = _read_safetensors_entry(path, lambda handle: tuple(handle.get_slice(LATENT_KEY).get_shape()))
    if len(shape) == 5 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 4:
        raise _corrupt(path, f"latents have shape {shape}, expected (channels, t, h, w)")
    return shape


TextLoader = Callable[[str], tuple[Tensor, Tensor]]


class LatentTextDataset(Dataset):
    """Samples of a manifest: latents (C, t, h, w) float32 with their caption's text features.

    `text_loader(path) -> (states (L, D), mask (L,) bool)`; the default reads mugen's text-feature
    files (`mugen.models.text.base.load_text_features`).
    """

    def __init__(
        self,
        manifest_path_or_rows: str | os.PathLike | list[ManifestRow],
        text_loader: TextLoader | None = None,
        cache_in_memory: bool = False,
    ):
        # cache_in_memory: keep each loaded sample (small datasets: the demo, tests); reading two
        # files per sample per step otherwise dominates the step time of small models.
        self._cache: dict[int, dict] | None = {} if cache_in_memory else None
        if isinstance(manifest_path_or_rows, (str, os.PathLike)):
            self.rows = read_manifest(manifest_path_or_rows)
        else:
            self.rows = list(manifest_path_or_rows)
        if not self.rows:
            raise MugenError("LatentTextDataset got no samples; give a manifest with at least one row")
        self._text_loader = text_loader

    def __len__(self) -> int:
        return len(self.rows)

    def _load_text(self, path: str) -> tuple[Tensor, Tensor]:
        if self._text_loader is None:
            from mugen.models.text.base import load_text_features

            self._text_loader = load_text_features
        return self._text_loader(path)

    def shape_key(self, index: int) -> tuple:
        """(kind, latent_frames, latent_height, latent_width): samples with one key can be stacked."""
        row = self.rows[index]
        if 0 in (row.latent_frames, row.latent_height, row.latent_width):
            _, row.latent_frames, row.latent_height, row.latent_width = latent_shape(row.latent_path)
        return (row.kind, row.latent_frames, row.latent_height, row.latent_width)

    def shape_keys(self) -> list[tuple]:
        return [self.shape_key(index) for index in range(len(self))]

    def __getitem__(self, index: int) -> dict:
        if self._cache is not None and index in self._cache:
            return dict(self._cache[index])
        item = self._load(index)
        if self._cache is not None:
            self._cache[index] = item
        return dict(item)

    def _load(self, index: int) -> dict:
        row = self.rows[index]
        latents = load_latent(row.latent_path).float()  # (C, t, h, w)
        expected = self.shape_key(index)[1:]
        if tuple(latents.shape[1:]) != expected:
            raise MugenError(
                f"latent file '{row.latent_path}' has shape {tuple(latents.shape)} but the manifest says "
                f"(t, h, w) = {expected}; re-run `mugen encode` to rebuild the manifest"
            )
        states, mask = self._load_text(row.text_feat_path)
        if states.dim() != 2 or mask.shape != states.shape[:1]:
            raise MugenError(
                f"text features '{row.text_feat_path}' have states {tuple(states.shape)} and mask "
                f"{tuple(mask.shape)}; expected (L, D) and (L,)"
            )
        return {
            "latents": latents,
            "text_states": states.float(),  # (L, D)
            "text_mask": mask.bool(),  # (L,)
            "fps": float(row.fps),
            "kind": row.kind,
            "sample_id": row.sample_id,
            "index": index,
        }


def collate_latent_batch(items: list[dict]) -> dict:
    """Stack one shape bucket: latents (B, C, t, h, w), text right-padded to the batch's longest.

    Returns {"latents", "text_states" (B, L, D), "text_mask" (B, L) bool (False on padding),
    "fps" (B,), "kinds", "sample_ids", "index" (B,)}.
    """
    if not items:
        raise ValueError("collate_latent_batch got an empty batch")
    shapes = {tuple(item["latents"].shape) for item in items}
    if len(shapes) > 1:
        raise ValueError(
            f"batch mixes latent shapes {sorted(shapes)}; latents can only be stacked within one "
            "shape bucket, so batch with a shape-bucketed sampler (mugen.data.sampling)"
        )
    widths = {item["text_states"].shape[-1] for item in items}
    if len(widths) > 1:
        raise ValueError(f"batch mixes text feature widths {sorted(widths)}; encode all captions with one text encoder")
    longest = max(item["text_states"].shape[0] for item in items)
    width = widths.pop()
    states = torch.zeros(len(items), longest, width, dtype=items[0]["text_states"].dtype)  # (B, L, D)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)  # (B, L)
    for b, item in enumerate(items):
        length = item["text_states"].shape[0]
        states[b, :length] = item["text_states"]
        mask[b, :length] = item["text_mask"]
    return {
        "latents": torch.stack([item["latents"] for item in items]),  # (B, C, t, h, w)
        "text_states": states,
        "text_mask": mask,
        "fps": torch.tensor([float(item["fps"]) for item in items], dtype=torch.float32),  # (B,)
        "kinds": [item["kind"] for item in items],
        "sample_ids": [item["sample_id"] for item in items],
        "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),  # (B,)
    }


class VideoClipDataset(Dataset):
    """In-memory clips (3, T, H, W) in [-1, 1] for Video VAE training; items {"video", "index"}."""

    def __init__(self, clips: list[Tensor]):
        if not clips:
            raise MugenError("VideoClipDataset got no clips; give at least one (3, T, H, W) video")
        for index, clip in enumerate(clips):
            if clip.dim() != 4 or clip.shape[0] != 3:
                raise MugenError(f"clip {index} has shape {tuple(clip.shape)}; expected (3, T, H, W)")
        self.clips = list(clips)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        return {"video": self.clips[index], "index": index}

    def shape_key(self, index: int) -> tuple:
        """(T, H, W): clips with one key can be stacked into a batch."""
        return tuple(self.clips[index].shape[1:])

    def shape_keys(self) -> list[tuple]:
        return [self.shape_key(index) for index in range(len(self))]
