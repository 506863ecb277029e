"""The one interface every text encoder of mugen follows, and the feature files they share.

MUG-DiT reads a caption as a sequence of token states and attends to them through cross-attention,
with padded tokens masked out (seed §3.2, "text condition networks" and the cross-attention block).
Whatever produces those states (packaged MiniLM, a local T5-XXL, or features precomputed by
`mugen encode`) hands them over as a `TextFeatures`: states `(B, L, D)` and a boolean mask
`(B, L)` where True marks a real token.

One sample's features are stored on disk as a safetensors file holding "states" `(L, D)` and
"mask" `(L,)`, with padding beyond the last real token trimmed away; the data collate pads them
back to a common length with `pad_text_features`.
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mugen.errors import MugenError

# dtypes a feature file may hold; anything else is stored as float32.
STORED_STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

ENCODER_SPEC_FORMS = (
    '"minilm" (the packaged MiniLM-L6, the offline default)',
    '"t5:/local/dir" (a T5 encoder saved in a local folder, e.g. DeepFloyd t5-v1_1-xxl)',
    '"precomputed:/dir" (features written by `mugen encode`, found through dir/index.json)',
)


@dataclass
class TextFeatures:
    """A batch of caption token states and the mask of real tokens.

    states: (B, L, D) float.  mask: (B, L) bool, True = real token, False = padding.
    """

    states: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.states.dim() != 3:
            raise MugenError(
                f"text features: states have shape {tuple(self.states.shape)}; expected (batch, tokens, width)"
            )
        if self.mask.shape != self.states.shape[:2]:
            raise MugenError(
                f"text features: mask shape {tuple(self.mask.shape)} does not match the states' "
                f"(batch, tokens) = {tuple(self.states.shape[:2])}"
            )
        if self.mask.dtype != torch.bool:
            self.mask = self.mask.bool()

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def lengths(self) -> Tensor:
        """(B,) number of real tokens in each sample."""
        return self.mask.sum(dim=1)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextFeatures:
        """Move to a device; `dtype` changes the states only (the mask stays bool)."""
        return TextFeatures(states=self.states.to(device=device, dtype=dtype), mask=self.mask.to(device=device))

    def select(self, indices: int | slice | Sequence[int] | Tensor) -> TextFeatures:
        """The samples at `indices`, still batched (an int index keeps a batch of one)."""
        if isinstance(indices, int):
            indices = slice(indices, indices + 1)
        return TextFeatures(states=self.states[indices], mask=self.mask[indices])

    __getitem__ = select

    def trimmed(self) -> TextFeatures:
        """Drop the trailing token positions that are padding in every sample of the batch."""
        length = _real_length(self.mask.any(dim=0))
        return TextFeatures(states=self.states[:, :length], mask=self.mask[:, :length])


def _real_length(mask: Tensor) -> int:
    """Index after the last True of a 1-D mask (0 if there is none)."""
    real_positions = torch.nonzero(mask, as_tuple=False)
    return int(real_positions[-1, 0]) + 1 if len(real_positions) else 0


def _as_batched(item: TextFeatures | tuple[Tensor, Tensor], position: int) -> TextFeatures:
    """A `TextFeatures` or a (states, mask) pair, one sample (L, D)/(L,) or batched, as a batch."""
    if isinstance(item, TextFeatures):
        return item
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise MugenError(
            f"text features item {position} is a {type(item).__name__}; give TextFeatures or a (states, mask) pair"
        )
    states, mask = item
    if states.dim() == 2:  # one sample: (L, D) -> (1, L, D), (L,) -> (1, L)
        states, mask = states.unsqueeze(0), mask.unsqueeze(0)
    return TextFeatures(states=states, mask=mask)


def pad_text_features(
    items: Sequence[TextFeatures] | Sequence[tuple[Tensor, Tensor]], length: int | None = None
) -> TextFeatures:
    """Stack samples along the batch, right-padding each to a common length (zero states, mask False).

    Items are `TextFeatures` or (states, mask) pairs as `load_text_features` returns them. `length`
    defaults to the longest item; a given length may cut trailing padding but never a real token.
    States are promoted to a common dtype; the result lives on the first item's device.
    """
    if not items:
        raise MugenError("pad_text_features got no items; give at least one sample's text features")
    batches = [_as_batched(item, position) for position, item in enumerate(items)]
    width = batches[0].states.shape[-1]
    for position, batch in enumerate(batches):
        if batch.states.shape[-1] != width:
            raise MugenError(
                f"text features item {position} has width {batch.states.shape[-1]} but item 0 has {width}; "
                "encode every sample with the same text encoder"
            )
    longest_real = max(_real_length(batch.mask.any(dim=0)) for batch in batches)
    if length is None:
        length = max(batch.states.shape[1] for batch in batches)
    elif length < longest_real:
        raise MugenError(
            f"text length {length} is shorter than a caption with {longest_real} real tokens; "
            f"give a text length of at least {longest_real}"
        )
    dtype = batches[0].states.dtype
    for batch in batches[1:]:
        dtype = torch.promote_types(dtype, batch.states.dtype)
    device = batches[0].states.device

    total = sum(len(batch) for batch in batches)
    states = torch.zeros(total, length, width, dtype=dtype, device=device)  # (B_total, length, D)
    mask = torch.zeros(total, length, dtype=torch.bool, device=device)  # (B_total, length)
    row = 0
    for batch in batches:
        kept = min(length, batch.states.shape[1])
        states[row : row + len(batch), :kept] = batch.states[:, :kept].to(device=device, dtype=dtype)
        mask[row : row + len(batch), :kept] = batch.mask[:, :kept].to(device=device)
        row += len(batch)
    return TextFeatures(states=states, mask=mask)


def concat_text_features(a: TextFeatures, b: TextFeatures) -> TextFeatures:
    """[a; b] along the batch, padded to a common length (CFG runs [cond; uncond] in one pass)."""
    return pad_text_features([a, b])


class TextEncoder(ABC):
    """Prompts -> `TextFeatures`. Subclasses set `name`, `dim`, `max_length` and implement `_encode`."""

    name: str
    dim: int
    max_length: int

    def encode(self, prompts: list[str], allow_empty: bool = False) -> TextFeatures:
        """Encode a batch of prompts to token states `(B, L, dim)` and a mask `(B, L)`.

        An empty or whitespace-only prompt is a user mistake unless `allow_empty` is set, which the
        null (unconditional) caption of classifier-free guidance uses.
        """
        if isinstance(prompts, str):
            raise MugenError(f"prompts must be a list of strings, got the single string {prompts[:60]!r}; wrap it in [ ]")
        prompts = list(prompts)
        if not prompts:
            raise MugenError("no prompts given; give at least one description of the video to generate")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise MugenError(f"prompt {index} is a {type(prompt).__name__}, not text; give each prompt as a string")
            if not allow_empty and not prompt.strip():
                raise MugenError(
                    f"prompt {index} is empty; give a description of the video to generate "
                    '(e.g. "a red car drives through a city at night")'
                )
        # no_grad, not inference_mode: the states feed a model that is being trained, and inference
        # tensors could not be saved for its backward pass.
        with torch.no_grad():
            return self._encode(prompts)

    @abstractmethod
    def _encode(self, prompts: list[str]) -> TextFeatures:
        """Encode validated prompts."""

    @abstractmethod
    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the encoder (and the features it returns) to `device`; returns self."""


@contextmanager
def atomic_output_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_text_features(path: str | os.PathLike, states: Tensor, mask: Tensor) -> None:
    """Write one sample's features (states (L, D), mask (L,)) to a safetensors file, atomically.

    Padding after the last real token is dropped (a T5 caption padded to 300 tokens stores only its
    real ones). States are kept as float16/bfloat16/float32; other dtypes are stored as float32.
    """
    path = Path(path)
    if states.dim() != 2 or mask.dim() != 1 or mask.shape[0] != states.shape[0]:
        raise MugenError(
            f"cannot save text features to {path}: states {tuple(states.shape)} and mask {tuple(mask.shape)} "
            "must be one sample, (tokens, width) and (tokens,)"
        )
    mask = mask.bool()
    length = _real_length(mask)
    if length == 0:
        raise MugenError(f"cannot save text features to {path}: the mask marks no real token; encode a caption first")
    if states.dtype not in STORED_STATE_DTYPES:
        states = states.float()
    tensors = {
        "states": states[:length].detach().cpu().contiguous(),  # (L_real, D)
        "mask": mask[:length].cpu().contiguous(),  # (L_real,)
    }
    with atomic_output_path(path) as temporary:
        save_file(tensors, temporary, metadata={"format": "mugen-text-features"})


def load_text_features(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Read one sample's features: states (L, D) in the stored dtype, mask (L,) bool."""
    path = Path(path)
    if not path.is_file():
        raise MugenError(f"text features file {path} does not exist; run `mugen encode` to write it")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise MugenError(f"text features file {path} is not a readable safetensors file ({error}); re-run `mugen encode`") from None
    missing = [key for key in ("states", "mask") if key not in tensors]
    if missing:
        raise MugenError(
            f"text features file {path} lacks {', '.join(missing)}; it holds {sorted(tensors)}. Re-run `mugen encode`"
        )
    states, mask = tensors["states"], tensors["mask"]
    if states.dim() != 2 or mask.dim() != 1 or mask.shape[0] != states.shape[0] or not states.is_floating_point():
        raise MugenError(
            f"text features file {path} holds states {tuple(states.shape)} {states.dtype} and mask {tuple(mask.shape)}; "
            "expected float (tokens, width) and (tokens,). Re-run `mugen encode`"
        )
    return states, mask.bool()


def build_text_encoder(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> TextEncoder:
    """Make a text encoder from a spec: "minilm", "t5:/local/dir" or "precomputed:/dir"."""
    kind, separator, location = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "minilm" and not location:
        from mugen.models.text.minilm import MiniLMTextEncoder

        return MiniLMTextEncoder(device=device, dtype=dtype)
    if kind in ("t5", "precomputed") and not location.strip():
        raise MugenError(f"text encoder {spec!r} needs a folder: write it as {kind}:/path/to/folder")
    if kind == "t5":
        from mugen.models.text.t5 import T5TextEncoder

        return T5TextEncoder(location, device=device, dtype=dtype)
    if kind == "precomputed":
        from mugen.models.text.precomputed import PrecomputedTextEncoder

        return PrecomputedTextEncoder(location, dtype=dtype).to(device)
    raise MugenError(f"unknown text encoder {spec!r}; use one of: {'; '.join(ENCODER_SPEC_FORMS)}")
