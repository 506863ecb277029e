"""Named MUG-DiT sizes (seed §3.2, §4.2.1).

All paper-scale presets keep depth 56 and head dim 72, as the report fixes the depth and grows the
width (2B at 1728 expands to 10B at 3456 with e = 2). ``debug`` is a tiny model for tests and the
CPU demo. ``text_dim`` defaults to T5-XXL's 4096; pass the text encoder's width to override.
"""

from __future__ import annotations

from collections.abc import Callable

from mugen.errors import MugenError
from mugen.models.dit.model import MUGDiTConfig


def _paper_size(hidden_size: int, num_heads: int) -> Callable[..., MUGDiTConfig]:
    def build(**overrides) -> MUGDiTConfig:
        return MUGDiTConfig(**{"hidden_size": hidden_size, "depth": 56, "num_heads": num_heads, **overrides})

    return build


def _debug(**overrides) -> MUGDiTConfig:
    return MUGDiTConfig(**{"hidden_size": 96, "depth": 3, "num_heads": 4, "text_dim": 384, **overrides})


DIT_PRESETS: dict[str, Callable[..., MUGDiTConfig]] = {
    "debug": _debug,
    "1B": _paper_size(1152, 16),
    "2B": _paper_size(1728, 24),
    "4B": _paper_size(2304, 32),
    "10B": _paper_size(3456, 48),
    "18B": _paper_size(4608, 64),
}


def dit_config(name: str, **overrides) -> MUGDiTConfig:
    """Config of a named preset, with field overrides (e.g. ``text_dim=384``)."""
    if name not in DIT_PRESETS:
        raise MugenError(f"unknown DiT preset {name!r}; choose one of {', '.join(DIT_PRESETS)}")
    return DIT_PRESETS[name](**overrides)
