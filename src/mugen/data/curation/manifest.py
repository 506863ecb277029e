"""The curation manifest: one Parquet row per clip, one per rejected video (seed §2.1).

`manifest.parquet` holds every clip that a run cut from its videos, kept or not, with every
score, the reasons it was dropped, its caption, tags, duplicate group and sampling weight, so a
threshold can be changed later without decoding anything again. `rejections.parquet` holds the
videos that never produced clips (unreadable, truncated, no frames, a crash in a stage), with a
reason code and a message.

Columns of `manifest.parquet` (`CLIP_COLUMNS`, then one `score_<name>` column per filter score):

    clip_id          "<video_id>-<clip_index:04d>", unique in a manifest
    video_id         "<file stem>-<8 hex of the absolute path's SHA-1>", stable across runs
    source_path      absolute path of the raw video
    source           data source name (the input folder's first sub-folder, or "default")
    clip_index       0, 1, ... within the video
    start_frame, end_frame, num_frames   frames [start, end) of the source video
    fps, start_s, end_s, duration_s      frame rate and clip times in seconds
    width, height, codec, rotation       the source video's displayed size, codec, rotation
    clip_path        the written H.264 clip, relative to the manifest's folder ("" = reference only)
    passed_filters   no filter rejected the clip
    filter_reasons   why filters dropped it (e.g. "motion<1"); [] = kept
    frame_hashes     64-bit pHash (16 hex digits) of frames at 1/4, 1/2, 3/4 of the clip
    caption          caption text ("" = uncaptioned)
    caption_source   "vlm", "sidecar" or ""
    tag_subjects, tag_actions, tag_scenes   key entities from the caption
    duplicate_of     clip_id of the clip kept in place of this one (null = not a duplicate)
    duplicate_reason "frame_hash" or "caption" (null = not a duplicate)
    sample_weight    balancing weight (sums to the number of kept clips; 0 for dropped clips)
    keep             passed_filters and not a duplicate: the clips to train on
    score_*          every score of `filters.score_clip` (null when not computed)

Writes are atomic (`mugen.atomic`): a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mugen.atomic import write_atomically
from mugen.errors import MugenError

MANIFEST_NAME = "manifest.parquet"
REJECTIONS_NAME = "rejections.parquet"
SCORE_PREFIX = "score_"

_STRINGS = pa.list_(pa.string())

CLIP_COLUMNS: dict[str, pa.DataType] = {
    "clip_id": pa.string(),
    "video_id": pa.string(),
    "source_path": pa.string(),
    "source": pa.string(),
    "clip_index": pa.int64(),
    "start_frame": pa.int64(),
    "end_frame": pa.int64(),
    "num_frames": pa.int64(),
    "fps": pa.float64(),
    "start_s": pa.float64(),
    "end_s": pa.float64(),
    "duration_s": pa.float64(),
    "width": pa.int64(),
    "height": pa.int64(),
    "codec": pa.string(),
    "rotation": pa.int64(),
    "clip_path": pa.string(),
    "passed_filters": pa.bool_(),
    "filter_reasons": _STRINGS,
    "frame_hashes": _STRINGS,
    "caption": pa.string(),
    "caption_source": pa.string(),
    "tag_subjects": _STRINGS,
    "tag_actions": _STRINGS,
    "tag_scenes": _STRINGS,
    "duplicate_of": pa.string(),
    "duplicate_reason": pa.string(),
    "sample_weight": pa.float64(),
    "keep": pa.bool_(),
}

# Values a new clip row starts with (filled in by later stages).
CLIP_DEFAULTS: dict[str, object] = {
    "clip_path": "",
    "passed_filters": True,
    "filter_reasons": [],
    "frame_hashes": [],
    "caption": "",
    "caption_source": "",
    "tag_subjects": [],
    "tag_actions": [],
    "tag_scenes": [],
    "duplicate_of": None,
    "duplicate_reason": None,
    "sample_weight": 0.0,
    "keep": True,
}

REJECTION_COLUMNS: dict[str, pa.DataType] = {
    "video_id": pa.string(),
    "source_path": pa.string(),
    "stage": pa.string(),  # the stage that failed: probe, split, filter, clips, ...
    "reason": pa.string(),  # short code (probe.py's codes, or "error" for an unexpected exception)
    "message": pa.string(),
}


def _score_type(values: list) -> pa.DataType:
    present = [value for value in values if value is not None]
    if present and all(isinstance(value, (bool,)) for value in present):
        return pa.bool_()
    if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in present):
        return pa.float64()
    return pa.string()


def clip_schema(rows: list[dict]) -> pa.Schema:
    """`CLIP_COLUMNS` plus the `score_*` columns present in `rows`, in first-seen order."""
    score_names: dict[str, None] = {}
    for row in rows:
        for name in row:
            if name.startswith(SCORE_PREFIX):
                score_names.setdefault(name)
    unknown = sorted({name for row in rows for name in row} - set(CLIP_COLUMNS) - set(score_names))
    if unknown:
        raise ValueError(f"clip rows hold columns the manifest does not know: {unknown}")
    fields = [pa.field(name, kind) for name, kind in CLIP_COLUMNS.items()]
    fields += [pa.field(name, _score_type([row.get(name) for row in rows])) for name in score_names]
    return pa.schema(fields)


def _column(rows: list[dict], name: str, kind: pa.DataType) -> list:
    default = CLIP_DEFAULTS.get(name)
    values = []
    for row in rows:
        value = row.get(name, default)
        if kind == pa.string() and value is not None and not isinstance(value, str):
            value = str(value)
        if kind == pa.float64() and value is not None:
            value = float(value)
        values.append(value)
    return values


def clips_to_table(rows: list[dict]) -> pa.Table:
    schema = clip_schema(rows)
    return pa.table({field.name: pa.array(_column(rows, field.name, field.type), type=field.type) for field in schema}, schema=schema)


def rejections_to_table(rows: list[dict]) -> pa.Table:
    return pa.table(
        {name: pa.array([row.get(name) for row in rows], type=kind) for name, kind in REJECTION_COLUMNS.items()},
        schema=pa.schema(list(REJECTION_COLUMNS.items())),
    )


def check_unique_clip_ids(rows: list[dict], where: str | os.PathLike) -> None:
    seen: set[str] = set()
    for row in rows:
        if row["clip_id"] in seen:
            raise MugenError(f"manifest {where} holds clip_id {row['clip_id']!r} twice; re-run `mugen curate` on a fresh --output")
        seen.add(row["clip_id"])


def write_table_atomically(path: str | os.PathLike, table: pa.Table) -> Path:
    return write_atomically(path, lambda temporary: pq.write_table(table, temporary))


def write_clip_manifest(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write clip rows (dicts keyed by `CLIP_COLUMNS` / `score_*`) as Parquet, atomically."""
    check_unique_clip_ids(rows, path)
    return write_table_atomically(path, clips_to_table(rows))


def write_rejections(path: str | os.PathLike, rows: list[dict]) -> Path:
    return write_table_atomically(path, rejections_to_table(rows))


def read_table_rows(path: str | os.PathLike, what: str = "manifest") -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise MugenError(f"{what} {path} does not exist; give the {MANIFEST_NAME} written by `mugen curate --output DIR`")
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise MugenError(f"{what} {path} is not a readable Parquet file ({error}); re-run `mugen curate`") from None


def read_clip_manifest(path: str | os.PathLike) -> list[dict]:
    """Clip rows of a curation manifest, with `CLIP_COLUMNS` checked."""
    rows = read_table_rows(path)
    if rows:
        missing = [name for name in ("clip_id", "video_id", "source_path", "start_frame", "end_frame") if name not in rows[0]]
        if missing:
            raise MugenError(
                f"manifest {path} lacks columns {missing}: it is not a curation manifest (a training manifest?); "
                "give the manifest.parquet written by `mugen curate`"
            )
    check_unique_clip_ids(rows, path)
    return rows


def score_columns(rows: list[dict]) -> list[str]:
    """Numeric `score_*` columns present in `rows`, in first-seen order."""
    names: dict[str, None] = {}
    for row in rows:
        for name, value in row.items():
            if name.startswith(SCORE_PREFIX) and isinstance(value, (int, float)) and not isinstance(value, bool):
                names.setdefault(name)
    return list(names)


def update_keep(rows: list[dict]) -> None:
    """`keep` = passed the filters and is not a duplicate."""
    for row in rows:
        row["keep"] = bool(row.get("passed_filters", True)) and row.get("duplicate_of") is None
