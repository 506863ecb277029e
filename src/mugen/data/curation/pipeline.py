"""The curation run: raw videos in, clips + manifest + report out (seed §2.1).

Two phases:

1. Per video, in parallel workers (`executors.py`): probe -> split -> score/filter -> frame
   hashes -> write clips (split and scores share one decoding pass, `filters.split_and_score`). Each worker handles one video at a time and streams its frames, so
   memory is bounded by the number of videos in flight, not by the data set. When a video is
   done, the driver writes its result to `OUT/.work/videos/<video_id>.json` (atomically): that
   shard is the only record that the video is finished. A restarted run skips every video that
   has a shard and redoes the others (their clip files are overwritten under the same names),
   so a run killed at any moment loses at most the videos in flight and never duplicates a row.
   A video that fails in any stage becomes one rejection row (stage, reason, message); the run
   goes on.
2. Over all clips, in the driver: captions (VLM, cached per video in `OUT/.work/captions/`, or
   sidecars) -> tags -> near-duplicates -> sampling weights -> `manifest.parquet`,
   `rejections.parquet`, `tags.json`, `clips.jsonl` (kept clip files + captions, the table
   `mugen encode --input` reads) and `report.html`, each written atomically.

Stages (`--stages`, default all): probe, split, filter, caption, tags, dedup, balance. Without
`split` each video is one clip; without `filter` no scores are computed and every clip passes.
Per-video settings are stored in `OUT/.work/run.json`; resuming with different ones is refused
(the finished shards would not match them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from mugen.atomic import write_text_atomically
from mugen.data.curation.balance import BalanceConfig, assign_sample_weights
from mugen.data.curation.caption import CaptionConfig
from mugen.data.curation.clips import ClipOutputConfig, clip_relative_path, write_clip
from mugen.data.curation.dedup import HASH_METHODS, DedupConfig, clip_frame_hashes, mark_duplicates
from mugen.data.curation.filters import FilterConfig, filter_reasons, score_clip, split_and_score
from mugen.data.curation.manifest import (
    MANIFEST_NAME,
    REJECTIONS_NAME,
    SCORE_PREFIX,
    update_keep,
    write_clip_manifest,
    write_rejections,
)
from mugen.data.curation.probe import CurationReject, probe_video
from mugen.data.curation.scenes import SceneClip, SceneSplitConfig, split_scenes
from mugen.errors import MugenError

logger = logging.getLogger(__name__)

STAGES = ("probe", "split", "filter", "caption", "tags", "dedup", "balance")
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".flv", ".wmv", ".3gp", ".ogv"}
)
WORK_DIR = ".work"
DEFAULT_SOURCE = "default"


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TagConfig:
    extractor: str = "keybert"  # "keybert" or "llm"
    llm_dir: str | None = None  # local causal LM folder for extractor "llm"


@dataclass
class CurationConfig:
    """Everything a run needs; `--config curate.json` holds any subset of these sections."""

    split: SceneSplitConfig = field(default_factory=SceneSplitConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    clips: ClipOutputConfig = field(default_factory=ClipOutputConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    tags: TagConfig = field(default_factory=TagConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    hash_method: str = "phash"

    def __post_init__(self) -> None:
        if self.hash_method not in HASH_METHODS:
            raise MugenError(f"hash_method {self.hash_method!r} is unknown; use one of {HASH_METHODS}")

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> CurationConfig:
        from mugen.train.runs import dataclass_from_dict  # imported here: only the driver parses configs

        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise MugenError(f"{where}: unknown sections {unknown}; valid: {sorted(sections)}")
        values = {}
        for name, value in data.items():
            if name == "hash_method":
                values[name] = value
            elif not isinstance(value, dict):
                raise MugenError(f"{where}: section {name!r} must be an object of settings")
            else:
                values[name] = dataclass_from_dict(type(sections[name].default_factory()), value, f"{where} section {name!r}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CurationConfig:
        path = Path(path)
        if not path.is_file():
            raise MugenError(f"--config {path} does not exist; give a JSON file of curation settings")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise MugenError(f"--config {path} is not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise MugenError(f"--config {path} must hold a JSON object of sections")
        return cls.from_dict(data, where=f"--config {path}")

    def to_dict(self) -> dict:
        data = {}
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                data[section.name] = {
                    f.name: getattr(value, f.name) for f in dataclasses.fields(value) if _json_safe(getattr(value, f.name))
                }
            else:
                data[section.name] = value
        return json.loads(json.dumps(data))


def _json_safe(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def parse_stages(text: str | None) -> tuple[str, ...]:
    """"probe,split,filter" -> the stages in pipeline order; None/"" -> all."""
    if not text:
        return STAGES
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [stage for stage in wanted if stage not in STAGES]
    if unknown:
        raise MugenError(f"--stages: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if "probe" not in wanted:
        raise MugenError("--stages must include probe: every other stage needs the probed video")
    if "balance" in wanted and "tags" not in wanted:
        raise MugenError("--stages: balance weighs clips by their tags; add tags (and caption) to the stages")
    return tuple(stage for stage in STAGES if stage in wanted)


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class VideoTask:
    path: str  # absolute
    video_id: str
    source: str


def video_id_for(path: Path) -> str:
    """"<stem>-<8 hex>": readable, and unique per absolute path (two `clip.mp4` in two folders differ)."""
    digest = hashlib.sha1(str(path.resolve()).encode("utf-8")).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:48] or "video"
    return f"{stem}-{digest}"


def list_inputs(source: str | os.PathLike) -> list[VideoTask]:
    """Videos under a folder (recursively, by suffix), or listed in a text file (one path per
    line, relative to the file's folder; # comments). The source name of a video in a folder is
    its first sub-folder (e.g. DIR/youtube/a.mp4 -> "youtube"), else "default"."""
    source = Path(source)
    if not source.exists():
        raise MugenError(f"--input {source} does not exist; give a folder of videos or a text file listing them")
    tasks: list[VideoTask] = []
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES):
            if any(part.startswith(".") for part in path.relative_to(source).parts):
                continue  # hidden files and folders (including an --output placed inside)
            relative = path.relative_to(source)
            group = relative.parts[0] if len(relative.parts) > 1 else DEFAULT_SOURCE
            tasks.append(VideoTask(str(path.resolve()), video_id_for(path), group))
        if not tasks:
            raise MugenError(f"--input {source} holds no video files ({', '.join(sorted(VIDEO_SUFFIXES))}); check the folder")
    else:
        for line in source.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path = Path(line) if Path(line).is_absolute() else source.parent / line
            tasks.append(VideoTask(str(path.resolve()), video_id_for(path), DEFAULT_SOURCE))
        if not tasks:
            raise MugenError(f"--input {source} lists no videos; write one video path per line")
    seen: set[str] = set()
    unique = []
    for task in tasks:
        if task.video_id not in seen:
            seen.add(task.video_id)
            unique.append(task)
    return unique


# ----------------------------------------------------------------------------------------------
# Phase 1: one video


@dataclass(frozen=True)
class VideoJob:
    """Everything a worker needs for one video (picklable for process pools and Ray)."""

    task: VideoTask
    output_dir: str
    stages: tuple[str, ...]
    split: SceneSplitConfig
    filter: FilterConfig
    clips: ClipOutputConfig
    hash_method: str


def _rejection(task: VideoTask, stage: str, reason: str, message: str) -> dict:
    return {"video_id": task.video_id, "source_path": task.path, "stage": stage, "reason": reason, "message": message}


def curate_video(job: VideoJob) -> dict:
    """probe -> split -> score/filter -> hash -> write clips, for one video. Never raises for a
    bad video: returns {"video_id", "clips": [rows], "rejection": row or None, "seconds"}."""
    started = time.perf_counter()
    task = job.task
    stage = "probe"
    try:
        probe = probe_video(task.path)
        stage = "split"
        split_config = job.split.for_source(task.source)
        if "split" in job.stages and "filter" in job.stages:
            scored = split_and_score(task.path, probe, split_config, job.filter)  # one decoding pass for both
        elif "split" in job.stages:
            scored = [(clip, None) for clip in split_scenes(task.path, probe, split_config)]
        else:
            whole = SceneClip(0, probe.num_frames, probe.fps)
            scored = [(whole, _score_or_error(task.path, probe, whole, job.filter) if "filter" in job.stages else None)]
        if not scored:
            rejection = _rejection(task, "split", "no_clips", f"no shot is at least {split_config.min_clip_s:g} s long")
            return {"video_id": task.video_id, "clips": [], "rejection": rejection, "seconds": time.perf_counter() - started}
        rows = []
        for index, (clip, scores) in enumerate(scored):
            stage = "filter"
            row = _clip_row(task, probe, clip, index)
            if scores is not None:
                reasons = scores.pop("_error", None) or filter_reasons(scores, job.filter)
                row.update({f"{SCORE_PREFIX}{name}": value for name, value in scores.items()})
                row["filter_reasons"] = reasons
                row["passed_filters"] = not reasons
            if row["passed_filters"] and "dedup" in job.stages:
                stage = "dedup"
                row["frame_hashes"] = clip_frame_hashes(task.path, probe.fps, clip.start_frame, clip.end_frame, job.hash_method)
            if row["passed_filters"] and job.clips.mode == "write":
                stage = "clips"
                relative = clip_relative_path(task.video_id, row["clip_id"])
                stored = (probe.height, probe.width) if probe.rotation in (90, 270) else (probe.width, probe.height)
                write_clip(
                    task.path, Path(job.output_dir) / relative, probe.fps, clip.start_frame, clip.end_frame, stored, probe.rotation, job.clips
                )
                row["clip_path"] = relative
            rows.append(row)
        return {"video_id": task.video_id, "clips": rows, "rejection": None, "seconds": time.perf_counter() - started}
    except CurationReject as error:
        rejection = _rejection(task, stage, error.reason, str(error))
    except Exception as error:  # noqa: BLE001 - any failure of one video is recorded, never fatal
        logger.debug("video %s failed in %s:\n%s", task.path, stage, traceback.format_exc())
        rejection = _rejection(task, stage, "error", f"{type(error).__name__}: {error}")
    return {"video_id": task.video_id, "clips": [], "rejection": rejection, "seconds": time.perf_counter() - started}


def _score_or_error(path: str, probe, clip: SceneClip, config: FilterConfig) -> dict:
    """Scores of one clip; an undecodable clip gets {"_error": [reason]} and is dropped, not the video."""
    try:
        return score_clip(path, probe, clip, config)
    except MugenError as error:
        return {"_error": [f"score_error: {error}"]}


def _clip_row(task: VideoTask, probe, clip: SceneClip, index: int) -> dict:
    return {
        "clip_id": f"{task.video_id}-{index:04d}",
        "video_id": task.video_id,
        "source_path": task.path,
        "source": task.source,
        "clip_index": index,
        "start_frame": clip.start_frame,
        "end_frame": clip.end_frame,
        "num_frames": clip.num_frames,
        "fps": probe.fps,
        "start_s": clip.start_s,
        "end_s": clip.end_s,
        "duration_s": clip.num_frames / probe.fps,
        "width": probe.width,
        "height": probe.height,
        "codec": probe.codec,
        "rotation": probe.rotation,
        "clip_path": "",
        "passed_filters": True,
        "filter_reasons": [],
    }


# ----------------------------------------------------------------------------------------------
# Shards (resumability)


class ShardStore:
    """`OUT/.work/videos/<video_id>.json`: one finished video each, written atomically."""

    def __init__(self, output_dir: Path):
        self.folder = output_dir / WORK_DIR / "videos"

    def path(self, video_id: str) -> Path:
        return self.folder / f"{video_id}.json"

    def done(self, video_id: str) -> bool:
        return self.path(video_id).is_file()

    def write(self, result: dict) -> None:
        write_text_atomically(self.path(result["video_id"]), json.dumps(result))

    def read(self, video_id: str) -> dict:
        return json.loads(self.path(video_id).read_text(encoding="utf-8"))


def _check_run_record(output_dir: Path, record: dict) -> None:
    """Refuse to resume a run whose per-video settings differ from this one's."""
    path = output_dir / WORK_DIR / "run.json"
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != record:
            changed = sorted(key for key in set(previous) | set(record) if previous.get(key) != record.get(key))
            raise MugenError(
                f"--output {output_dir} holds a run with different per-video settings ({', '.join(changed)}); "
                f"use a new --output, or delete {output_dir / WORK_DIR} to start over"
            )
    else:
        write_text_atomically(path, json.dumps(record, indent=1))


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class CurationResult:
    output_dir: Path
    manifest: Path
    rejections: Path
    report: Path | None
    videos: int
    videos_processed: int  # in this invocation (the rest were finished by an earlier one)
    clips: int
    kept: int
    rejected_videos: int
    stage_counts: dict[str, int]


def run_curation(
    inputs: str | os.PathLike | list[VideoTask],
    output_dir: str | os.PathLike,
    config: CurationConfig | None = None,
    stages: tuple[str, ...] = STAGES,
    executor: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
    vlm_dir: str | None = None,
    captions_file: str | None = None,
    write_report_files: bool = True,
) -> CurationResult:
    """Curate the videos of `inputs` (folder, list file, or tasks) into `output_dir`."""
    from tqdm import tqdm

    from mugen.data.curation.executors import make_executor

    config = config or CurationConfig()
    output_dir = Path(output_dir)
    tasks = inputs if isinstance(inputs, list) else list_inputs(inputs)
    inside_output = output_dir.resolve()
    tasks = [task for task in tasks if inside_output not in Path(task.path).parents]  # our own clips are no input
    if not tasks:
        raise MugenError("no videos to curate; give --input a folder of videos or a list file")
    if output_dir.exists() and not output_dir.is_dir():
        raise MugenError(f"--output {output_dir} is a file; give a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    per_video = {
        "stages": [stage for stage in stages if stage in ("probe", "split", "filter", "dedup")],
        "split": config.to_dict()["split"],
        "filter": config.to_dict()["filter"],
        "clips": config.to_dict()["clips"],
        "hash_method": config.hash_method,
    }
    _check_run_record(output_dir, per_video)
    shards = ShardStore(output_dir)
    todo = [task for task in tasks if not shards.done(task.video_id)]
    if len(todo) < len(tasks):
        logger.info("resuming: %d of %d videos were finished by an earlier run", len(tasks) - len(todo), len(tasks))
    jobs = (
        VideoJob(task, str(output_dir), tuple(stages), config.split, config.filter, config.clips, config.hash_method)
        for task in todo
    )
    # A worker process that died (not a video that failed: `curate_video` records those itself)
    # takes the videos in flight with it; they get no shard, so a restart tries them again.
    crashed: dict[str, dict] = {}
    if todo:
        pool = make_executor(executor, workers, ray_address)
        try:
            with tqdm(total=len(todo), desc="videos", unit="video") as progress:
                for job, outcome in pool.map_unordered(curate_video, jobs):
                    if isinstance(outcome, BaseException):
                        message = f"the worker process died ({type(outcome).__name__}: {outcome}); a restart retries it"
                        crashed[job.task.video_id] = _rejection(job.task, "worker", "crash", message)
                    else:
                        shards.write(outcome)
                    progress.update(1)
        finally:
            pool.close()

    # Phase 2: merge the shards of this input list, in input order.
    rows: list[dict] = []
    rejections: list[dict] = []
    for task in tasks:
        if task.video_id in crashed:
            rejections.append(crashed[task.video_id])
            continue
        result = shards.read(task.video_id)
        rows += result["clips"]
        if result["rejection"] is not None:
            rejections.append(result["rejection"])
    return finish_manifest(
        rows,
        rejections,
        output_dir,
        config,
        stages,
        vlm_dir=vlm_dir,
        captions_file=captions_file,
        videos=len(tasks),
        videos_processed=len(todo),
        write_report_files=write_report_files,
    )


def finish_manifest(
    rows: list[dict],
    rejections: list[dict],
    output_dir: Path,
    config: CurationConfig,
    stages: tuple[str, ...],
    vlm_dir: str | None = None,
    captions_file: str | None = None,
    videos: int = 0,
    videos_processed: int = 0,
    write_report_files: bool = True,
) -> CurationResult:
    """Phase 2: caption, tag, de-duplicate, weigh; write manifest, rejections, tags, report."""
    from mugen.data.curation.report import write_report

    notes: list[str] = []
    caption_counts = None
    if "caption" in stages:
        caption_counts = run_caption_stage(rows, output_dir, config, vlm_dir, captions_file)
        if caption_counts["uncaptioned"]:
            notes.append(
                f"{caption_counts['uncaptioned']} clips that passed the filters are uncaptioned"
                + ("" if vlm_dir or captions_file else ": no --vlm model and no --captions sidecar given (NAME.txt sidecars are read when present)")
            )
    if "tags" in stages:
        run_tag_stage(rows, config)
    if "dedup" in stages:
        run_dedup_stage(rows, config)
    update_keep(rows)
    if "balance" in stages:
        assign_sample_weights(rows, config.balance)
    else:
        for row in rows:
            row["sample_weight"] = 1.0 if row["keep"] else 0.0
    manifest = write_clip_manifest(output_dir / MANIFEST_NAME, rows)
    rejection_path = write_rejections(output_dir / REJECTIONS_NAME, rejections)
    from mugen.data.curation.tags import tag_ontology

    write_text_atomically(output_dir / "tags.json", json.dumps(tag_ontology(rows), indent=1))
    write_training_list(output_dir, rows)
    write_text_atomically(output_dir / "curate_config.json", json.dumps({"stages": list(stages), **config.to_dict()}, indent=1))
    counts = stage_counts(rows, rejections, videos or len({row["video_id"] for row in rows}) + len(rejections))
    report = None
    if write_report_files:
        report = write_report(output_dir, rows, rejections, counts, caption_counts=caption_counts, notes=notes, filter_config=config.filter)
    return CurationResult(
        output_dir=output_dir,
        manifest=manifest,
        rejections=rejection_path,
        report=report,
        videos=videos,
        videos_processed=videos_processed,
        clips=len(rows),
        kept=sum(1 for row in rows if row["keep"]),
        rejected_videos=len(rejections),
        stage_counts=counts,
    )


TRAINING_LIST_NAME = "clips.jsonl"


def write_training_list(output_dir: Path, rows: list[dict]) -> Path:
    """`clips.jsonl`: the kept clips that have a file, as `mugen encode --input` reads a table
    (`path` relative to this file, `caption`), plus `clip_id` and `sample_weight`."""
    lines = [
        json.dumps({"path": row["clip_path"], "caption": row.get("caption") or "", "clip_id": row["clip_id"], "sample_weight": row["sample_weight"]})
        for row in rows
        if row.get("keep") and row.get("clip_path")
    ]
    return write_text_atomically(output_dir / TRAINING_LIST_NAME, "".join(line + "\n" for line in lines))


def stage_counts(rows: list[dict], rejections: list[dict], videos: int) -> dict[str, int]:
    """How many remain after each stage: the funnel shown in the report."""
    passed = [row for row in rows if row.get("passed_filters", True)]
    return {
        "videos": videos,
        "videos readable": videos - sum(1 for r in rejections if r["stage"] == "probe"),
        "videos with clips": len({row["video_id"] for row in rows}),
        "clips split": len(rows),
        "clips passing filters": len(passed),
        "clips captioned": sum(1 for row in passed if row.get("caption")),
        "clips not duplicates": sum(1 for row in passed if row.get("duplicate_of") is None),
        "clips kept": sum(1 for row in rows if row.get("keep")),
    }


def run_caption_stage(rows: list[dict], output_dir: Path, config: CurationConfig, vlm_dir: str | None, captions_file: str | None) -> dict:
    from mugen.data.curation.caption import QwenVLCaptioner, caption_rows, load_caption_mapping

    mapping = load_caption_mapping(captions_file) if captions_file else None
    captioner = QwenVLCaptioner(vlm_dir, config.caption) if vlm_dir else None
    return caption_rows(rows, output_dir, captioner=captioner, mapping=mapping, cache_dir=output_dir / WORK_DIR / "captions")


def run_tag_stage(rows: list[dict], config: CurationConfig) -> int:
    from mugen.data.curation.tags import make_tag_extractor, tag_rows

    if not any(row.get("caption") for row in rows):
        return 0
    options = {"model_dir": config.tags.llm_dir} if config.tags.extractor == "llm" else {}
    return tag_rows(rows, make_tag_extractor(config.tags.extractor, **options))


def run_dedup_stage(rows: list[dict], config: CurationConfig) -> int:
    embed = None
    if config.dedup.use_captions and any(row.get("caption") for row in rows):
        from mugen.data.curation.tags import shared_embedder

        embed = shared_embedder()
    return mark_duplicates(rows, config.dedup, embed=embed)


# ----------------------------------------------------------------------------------------------
# One stage over an existing manifest (`mugen curate tags --manifest M`, ...)

MANIFEST_STAGES = ("caption", "tags", "dedup", "balance", "report")


def ensure_frame_hashes(rows: list[dict], manifest_dir: Path, method: str) -> int:
    """Hash the clips that passed the filters but have no `frame_hashes` yet (a run without the
    dedup stage): from the written clip when there is one, else from the source range."""
    missing = [row for row in rows if row.get("passed_filters", True) and len(row.get("frame_hashes") or []) != 3]
    for row in missing:
        try:
            if row.get("clip_path"):
                row["frame_hashes"] = clip_frame_hashes(manifest_dir / row["clip_path"], row["fps"], 0, row["num_frames"], method)
            else:
                row["frame_hashes"] = clip_frame_hashes(row["source_path"], row["fps"], row["start_frame"], row["end_frame"], method)
        except MugenError as error:
            logger.warning("clip %s: cannot hash its frames (%s); it is not de-duplicated by frames", row["clip_id"], error)
    return len(missing)


def run_manifest_stage(
    stage: str,
    manifest: str | os.PathLike,
    config: CurationConfig | None = None,
    vlm_dir: str | None = None,
    captions_file: str | None = None,
) -> dict:
    """Run one stage over the clips of `manifest` and write it back (atomically), with the report."""
    from mugen.data.curation.manifest import read_clip_manifest, read_table_rows
    from mugen.data.curation.report import write_report

    if stage not in MANIFEST_STAGES:
        raise MugenError(f"stage {stage!r} cannot run on a manifest alone; choose from {', '.join(MANIFEST_STAGES)}")
    config = config or CurationConfig()
    manifest = Path(manifest)
    rows = read_clip_manifest(manifest)
    output_dir = manifest.parent
    rejection_path = output_dir / REJECTIONS_NAME
    rejections = read_table_rows(rejection_path, "rejections table") if rejection_path.is_file() else []
    summary: dict = {"clips": len(rows)}
    caption_counts = None
    if stage == "caption":
        if not vlm_dir and not captions_file:
            raise MugenError("`mugen curate caption` needs --vlm DIR (a local Qwen2-VL model) or --captions FILE (a sidecar)")
        caption_counts = run_caption_stage(rows, output_dir, config, vlm_dir, captions_file)
        summary.update(caption_counts)
    elif stage == "tags":
        summary["tagged"] = run_tag_stage(rows, config)
    elif stage == "dedup":
        summary["hashed"] = ensure_frame_hashes(rows, output_dir, config.hash_method)
        summary["duplicates"] = run_dedup_stage(rows, config)
    elif stage == "balance":
        update_keep(rows)
        assign_sample_weights(rows, config.balance)
    update_keep(rows)
    if stage == "tags":
        from mugen.data.curation.tags import tag_ontology

        write_text_atomically(output_dir / "tags.json", json.dumps(tag_ontology(rows), indent=1))
    if stage != "report":
        write_clip_manifest(manifest, rows)
        write_training_list(output_dir, rows)
    videos = len({row["video_id"] for row in rows}) + len(rejections)
    counts = stage_counts(rows, rejections, videos)
    summary["report"] = str(write_report(output_dir, rows, rejections, counts, caption_counts=caption_counts, filter_config=config.filter))
    summary["kept"] = counts["clips kept"]
    return summary
