"""Training manifests: one row per sample, pointing at its VAE latents and text features.

Two formats:
- Parquet (`.parquet`), mugen's own: all of `MANIFEST_COLUMNS`, including the latent shape, so a
  shape-bucketing sampler can group samples without opening a single latent file.
- CSV (`.csv`) in the official MUG-V training layout, `sample_id,source,latent_path,text_feat_path`.
  Missing shape columns are filled in from the latent files' headers when read.

Paths inside the manifest's folder are stored relative to it, so a dataset folder can be moved or
copied to another machine as a whole; `read_manifest` returns absolute paths.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mugen.data import write_atomically
from mugen.errors import MugenError

OFFICIAL_CSV_COLUMNS = ("sample_id", "source", "latent_path", "text_feat_path")
KINDS = ("video", "image")
# VAE compression (seed §3.1: 8x8x8): pixel sizes are recovered from latent sizes by this factor.
_LATENT_TO_PIXEL = 8


@dataclass
class ManifestRow:
    """One training sample: its latents (24, t, h, w), its caption's text features, and shapes."""

    sample_id: str
    source: str
    latent_path: str
    text_feat_path: str
    caption: str = ""
    kind: str = "video"  # "video" | "image"
    num_frames: int = 0
    height: int = 0
    width: int = 0
    latent_frames: int = 0
    latent_height: int = 0
    latent_width: int = 0
    fps: float = 0.0


MANIFEST_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ManifestRow))
_COLUMN_TYPES = {f.name: f.type for f in fields(ManifestRow)}
_ARROW_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64()}
_SHAPE_COLUMNS = ("latent_frames", "latent_height", "latent_width")
_PATH_COLUMNS = ("latent_path", "text_feat_path")


def _stored_path(value: str, folder: Path) -> str:
    """Path as written into a manifest in `folder`: relative (POSIX) when inside it, else absolute."""
    absolute = Path(value).expanduser().resolve()
    try:
        return absolute.relative_to(folder).as_posix()
    except ValueError:
        return str(absolute)


def _check_rows(rows: list[ManifestRow], path: Path) -> None:
    if not rows:
        raise MugenError(f"manifest '{path}' would be empty; give at least one row")
    seen: set[str] = set()
    for row in rows:
        if not row.sample_id:
            raise MugenError(f"manifest '{path}' has a row with an empty sample_id; give every row an id")
        if row.sample_id in seen:
            raise MugenError(f"manifest '{path}' repeats sample_id '{row.sample_id}'; sample ids must be unique")
        seen.add(row.sample_id)
        if row.kind not in KINDS:
            raise MugenError(f"manifest row '{row.sample_id}' has kind '{row.kind}'; use one of {', '.join(KINDS)}")


def write_manifest(path: str | os.PathLike, rows: list[ManifestRow]) -> Path:
    """Write rows to a `.parquet` manifest (atomically); relative row paths mean the current directory."""
    path = Path(path)
    if path.suffix.lower() != ".parquet":
        raise MugenError(f"manifest '{path}' must end in .parquet (CSV is read-only, for the official layout)")
    _check_rows(rows, path)
    folder = path.parent.expanduser().resolve()
    records = []
    for row in rows:
        record = asdict(row)
        for column in _PATH_COLUMNS:
            record[column] = _stored_path(record[column], folder)
        records.append(record)
    schema = pa.schema([(name, _ARROW_TYPES[_COLUMN_TYPES[name]]) for name in MANIFEST_COLUMNS])
    table = pa.Table.from_pylist(records, schema=schema)
    return write_atomically(path, lambda temporary: pq.write_table(table, temporary))


def _read_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
    except (pa.ArrowException, OSError, csv.Error, UnicodeDecodeError) as error:
        raise MugenError(f"manifest '{path}' is unreadable or corrupt ({error}); rewrite it") from None
    raise MugenError(f"manifest '{path}' must end in .parquet or .csv")


def _convert(value, column: str, path: Path, line: int):
    """A CSV string (or Parquet value) as the column's Python type; empty means the default."""
    kind = _COLUMN_TYPES[column]
    if value is None or value == "":
        return None
    if kind == "str":
        return str(value)
    try:
        return int(value) if kind == "int" else float(value)
    except ValueError:
        raise MugenError(f"manifest '{path}' row {line}: {column}={value!r} is not a number") from None


def _fill_shapes_from_latent(row: ManifestRow) -> None:
    """Official CSVs carry no shapes: read them from the latent file header (24, t, h, w)."""
    from mugen.data.datasets import latent_shape

    _, frames, height, width = latent_shape(row.latent_path)
    row.latent_frames, row.latent_height, row.latent_width = frames, height, width
    if row.num_frames == 0:
        # seed §3.1: 8x temporal compression in the release's layout, 1 + 8k frames <-> 1 + k
        # latent frames (mugen.models.vae.frames); an image is one frame.
        row.num_frames = 1 if row.kind == "image" else 1 + (frames - 1) * _LATENT_TO_PIXEL
    if row.height == 0:
        row.height = height * _LATENT_TO_PIXEL
    if row.width == 0:
        row.width = width * _LATENT_TO_PIXEL


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a `.parquet` or official-layout `.csv` manifest; paths come back absolute."""
    path = Path(path)
    if not path.is_file():
        raise MugenError(f"manifest '{path}' not found; check the path")
    records = _read_records(path)
    if not records:
        raise MugenError(f"manifest '{path}' has no rows")
    missing = [column for column in OFFICIAL_CSV_COLUMNS if column not in records[0]]
    if missing:
        raise MugenError(
            f"manifest '{path}' lacks the columns {', '.join(missing)}; it needs at least {','.join(OFFICIAL_CSV_COLUMNS)}"
        )
    folder = path.parent.expanduser().resolve()
    rows = []
    progress = tqdm(records, desc=f"reading {path.name}", leave=False, disable=len(records) < 10_000)
    for line, record in enumerate(progress, start=1):
        values = {}
        for column in MANIFEST_COLUMNS:
            value = _convert(record.get(column), column, path, line)
            if value is not None:
                values[column] = value
        for column in OFFICIAL_CSV_COLUMNS:
            if column not in values and column != "source":
                raise MugenError(f"manifest '{path}' row {line} has an empty {column}; fill it in")
        values.setdefault("source", "")
        for column in _PATH_COLUMNS:
            values[column] = os.path.normpath(folder / Path(values[column]).expanduser())
        row = ManifestRow(**values)
        if any(getattr(row, column) == 0 for column in _SHAPE_COLUMNS):
            _fill_shapes_from_latent(row)
        rows.append(row)
    _check_rows(rows, path)
    return rows
