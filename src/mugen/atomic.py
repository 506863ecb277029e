"""Atomic file writes: a reader never sees a half-written file, a failed write leaves none behind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], durable: bool = False) -> Path:
    """Call `write(temporary_path)` on a hidden sibling of `path`, then `os.replace` it into place.

    The temporary keeps `path`'s suffix (some writers pick the format from it). If `write` fails,
    the temporary is removed and `path` is left as it was. `durable` fsyncs the file before the
    rename (checkpoint pointers), so a power cut cannot leave an empty file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        write(temporary)
        if durable:
            descriptor = os.open(temporary, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def write_text_atomically(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"), durable=durable)
