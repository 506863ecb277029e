"""Text features computed once by `mugen encode` and read back by prompt.

Encoding every caption with T5-XXL at each training step would cost more than the DiT step on small
models, so features are stored per sample (see `save_text_features`) and found again through
`index.json` in the same folder: `{prompt: path relative to the folder}`. A prompt not in the index
is an error, never a silently different condition. The null condition of classifier-free guidance
is looked up like any prompt (its key is the empty string when `mugen encode` stored it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mugen.errors import MugenError
from mugen.models.text.base import (
    TextEncoder,
    TextFeatures,
    atomic_output_path,
    load_text_features,
    pad_text_features,
)

INDEX_NAME = "index.json"


def _stored_shape(path: Path) -> tuple[int, int]:
    """(L, D) of a feature file's states, read from its header only."""
    if not path.is_file():
        raise MugenError(f"text features file {path} does not exist; re-run `mugen encode` for this folder")
    try:
        with safe_open(path, framework="pt") as handle:
            length, width = handle.get_slice("states").get_shape()
    except (SafetensorError, OSError, ValueError) as error:
        raise MugenError(f"text features file {path} is not a readable feature file ({error}); re-run `mugen encode`") from None
    return int(length), int(width)


def write_precomputed_index(directory: str | os.PathLike, mapping: Mapping[str, str | os.PathLike]) -> Path:
    """Write `directory/index.json` mapping each prompt to its feature file; returns the index path.

    Paths may be relative to `directory` or absolute inside it; every file must already exist.
    """
    directory = Path(directory)
    entries: dict[str, str] = {}
    for prompt, feature_path in mapping.items():
        if not isinstance(prompt, str):
            raise MugenError(f"precomputed index key {prompt!r} is not a prompt string")
        feature_path = Path(feature_path)
        if feature_path.is_absolute():
            try:
                feature_path = feature_path.resolve().relative_to(directory.resolve())
            except ValueError:
                raise MugenError(
                    f"feature file {feature_path} is outside {directory}; store features inside the folder they are indexed in"
                ) from None
        if not (directory / feature_path).is_file():
            raise MugenError(f"feature file {directory / feature_path} for prompt {prompt[:60]!r} does not exist; save it first")
        entries[prompt] = feature_path.as_posix()
    with atomic_output_path(directory / INDEX_NAME) as temporary:
        temporary.write_text(json.dumps(entries, indent=1, ensure_ascii=False))
    return directory / INDEX_NAME


class PrecomputedTextEncoder(TextEncoder):
    """Prompts -> stored features from `directory`, right-padded to the longest prompt of the batch."""

    name = "precomputed"

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype | None = None):
        self.directory = Path(directory).expanduser()
        index_path = self.directory / INDEX_NAME
        if not index_path.is_file():
            raise MugenError(
                f"precomputed text folder {self.directory} has no {INDEX_NAME}; run `mugen encode` to write the features and index"
            )
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as error:
            raise MugenError(f"{index_path} is not readable JSON ({error}); re-run `mugen encode`") from None
        if not isinstance(index, dict) or not index or not all(isinstance(value, str) for value in index.values()):
            raise MugenError(f"{index_path} must map prompts to feature files and hold at least one; re-run `mugen encode`")
        self.index: dict[str, str] = index
        self.dim = _stored_shape(self.directory / next(iter(index.values())))[1]
        self.device = torch.device("cpu")
        self.dtype = dtype

    @cached_property
    def max_length(self) -> int:
        """The longest stored caption, in tokens (reads every file's header once)."""
        return max(_stored_shape(self.directory / relative)[0] for relative in self.index.values())

    def feature_path(self, prompt: str) -> Path:
        """The file holding `prompt`'s features."""
        if prompt not in self.index:
            raise MugenError(
                f"prompt {prompt[:80]!r} has no precomputed features in {self.directory / INDEX_NAME}; "
                "encode it with `mugen encode` or use a live text encoder (minilm or t5:/dir)"
            )
        return self.directory / self.index[prompt]

    def _encode(self, prompts: list[str]) -> TextFeatures:
        samples = []
        for prompt in prompts:
            states, mask = load_text_features(self.feature_path(prompt))  # (L_i, D), (L_i,)
            if states.shape[-1] != self.dim:
                raise MugenError(
                    f"{self.feature_path(prompt)} has width {states.shape[-1]} but this folder's features have {self.dim}; "
                    "re-run `mugen encode` with one text encoder"
                )
            samples.append((states, mask))
        return pad_text_features(samples).to(device=self.device, dtype=self.dtype)  # (B, max L_i, D)

    def to(self, device: torch.device | str) -> PrecomputedTextEncoder:
        self.device = torch.device(device)
        return self
