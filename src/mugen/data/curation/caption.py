"""Captions for curated clips: a local vision-language model, or sidecar files (seed §2.1).

The seed captions clips with a Qwen2-VL model tuned for "descriptions that cover objects,
appearance, motion, and background context". `QwenVLCaptioner` runs any local checkout in the
Qwen2-VL layout (`Qwen2VLForConditionalGeneration` + its processor) with the structured prompt
`CAPTION_PROMPT`, on `frames_per_clip` frames sampled evenly over each clip (given as images in
time order), several clips per `generate` call, on the GPU when there is one (bfloat16 there).

Without a model, captions can come from sidecars:
- `NAME.txt` beside `NAME.mp4`: one caption for every clip of that video;
- a CSV (columns `caption` and one of `clip_id`, `video`, `path`) or JSONL (objects with the same
  keys) mapping: a `clip_id` key captions that clip, a `video`/`path` key (full path, file name or
  stem) captions all clips of that video.
Clips that neither gives a caption stay uncaptioned (`caption` = ""); the report counts them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mugen.atomic import write_text_atomically
from mugen.errors import MugenError

logger = logging.getLogger(__name__)

CAPTION_PROMPT = (
    "These {num_frames} frames are taken in time order from one video clip. Describe the clip in five lines:\n"
    "Objects: the main subjects and objects.\n"
    "Appearance: their colours, clothing, materials and look.\n"
    "Motion: what moves, how and in which direction.\n"
    "Background: the setting, place, lighting and time of day.\n"
    "Camera: how the camera moves (static, pan, tilt, zoom, handheld) and the shot size."
)
SIDECAR_KEYS = ("clip_id", "video", "path")


@dataclass
class CaptionConfig:
    frames_per_clip: int = 4  # frames sampled evenly over each clip
    frame_short_side: int = 336  # frames are decoded at this short side (pixels)
    batch_size: int = 8  # clips per generate() call
    max_new_tokens: int = 192
    device: str | None = None  # None: "cuda" when available, else "cpu"

    def __post_init__(self) -> None:
        if self.frames_per_clip < 1:
            raise MugenError(f"caption frames_per_clip {self.frames_per_clip} must be at least 1")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise MugenError("caption batch_size and max_new_tokens must be at least 1")


def caption_frame_indices(num_frames: int, count: int) -> list[int]:
    """`count` frame numbers (0-based within the clip) at the centres of equal parts of it."""
    count = min(count, num_frames)
    return [int((part + 0.5) * num_frames / count) for part in range(count)]


# ----------------------------------------------------------------------------------------------
# Vision-language model


class ImageTextProcessor:
    """The part of `Qwen2VLProcessor` that captioning uses (text + images), built from the
    folder's tokenizer and image processor. transformers' `Qwen2VLProcessor` also builds a video
    processor, which needs torchvision; this one does not, and produces the same inputs:
    each `<|image_pad|>` is repeated once per merged patch of its image."""

    def __init__(self, tokenizer, image_processor, image_token: str = "<|image_pad|>"):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize)

    def __call__(self, text: list[str], images: list[list[np.ndarray]], padding: bool = True, return_tensors: str = "pt"):
        import torch

        flat = [image for clip in images for image in clip]
        image_inputs = self.image_processor(images=flat, return_tensors="pt")
        merge = int(self.image_processor.merge_size) ** 2
        tokens_per_image = iter((image_inputs["image_grid_thw"].prod(-1) // merge).tolist())
        expanded = []
        for prompt in text:
            pieces = prompt.split(self.image_token)
            out = pieces[0]
            for piece in pieces[1:]:
                out += self.image_token * int(next(tokens_per_image)) + piece
            expanded.append(out)
        tokens = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
        tokens["mm_token_type_ids"] = (tokens["input_ids"] == self.image_token_id).to(torch.int32)  # 1 = image token
        return {**tokens, **image_inputs}

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)


def load_vlm_processor(model_dir: Path):
    """`AutoProcessor` from the folder; where it cannot be built (no torchvision for the video
    processor), the equivalent `ImageTextProcessor` from the folder's tokenizer + image processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except ImportError as error:
        logger.info("AutoProcessor unavailable (%s); using the tokenizer + image processor of %s", str(error).strip().splitlines()[0], model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, padding_side="left")
    image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    return ImageTextProcessor(tokenizer, image_processor)


class QwenVLCaptioner:
    """Clips (lists of RGB frames) -> captions, with a local Qwen2-VL-layout model."""

    name = "vlm"

    def __init__(self, model_dir: str | os.PathLike, config: CaptionConfig | None = None, prompt: str = CAPTION_PROMPT):
        import torch
        from transformers import Qwen2VLForConditionalGeneration

        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise MugenError(f"--vlm {folder} is not a Qwen2-VL model folder (no config.json); give a local checkout, e.g. of Qwen2-VL-7B-Instruct")
        self.config = config or CaptionConfig()
        self.device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.model = Qwen2VLForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as error:
            raise MugenError(f"--vlm {folder}: cannot load a Qwen2-VL model from it ({error})") from None
        self.model.eval().requires_grad_(False).to(self.device)
        self.processor = load_vlm_processor(folder)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"  # generation appends on the right
        self.prompt = prompt

    def _chat(self, num_frames: int) -> str:
        content = [{"type": "image"} for _ in range(num_frames)]
        content.append({"type": "text", "text": self.prompt.format(num_frames=num_frames)})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)

    def __call__(self, clips: list[list[np.ndarray]]) -> list[str]:
        import torch

        captions: list[str] = []
        for start in range(0, len(clips), self.config.batch_size):
            batch = clips[start : start + self.config.batch_size]
            text = [self._chat(len(frames)) for frames in batch]
            inputs = self.processor(text=text, images=batch, padding=True, return_tensors="pt")
            inputs = {name: value.to(self.device) if hasattr(value, "to") else value for name, value in inputs.items()}
            with torch.inference_mode():
                generated = self.model.generate(**inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]  # (B, new)
            captions += [caption.strip() for caption in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        return captions


# ----------------------------------------------------------------------------------------------
# Sidecars


def load_caption_mapping(path: str | os.PathLike) -> dict[str, str]:
    """{key: caption} from a CSV or JSONL sidecar (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise MugenError(f"--captions {path} does not exist; give a CSV or JSONL file of captions")
    records: list[dict] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            records = list(csv.DictReader(handle))
    elif path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise MugenError(f"--captions {path} line {number} is not JSON ({error}); write one object per line") from None
    else:
        raise MugenError(f"--captions {path} must be a .csv or .jsonl file")
    mapping: dict[str, str] = {}
    for number, record in enumerate(records, start=1):
        key = next((str(record[name]) for name in SIDECAR_KEYS if record.get(name)), None)
        if key is None or "caption" not in record:
            raise MugenError(f"--captions {path} record {number} needs a 'caption' and one of {SIDECAR_KEYS}")
        mapping[key] = str(record["caption"]).strip()
    return mapping


def sidecar_caption(row: dict, mapping: dict[str, str] | None) -> str | None:
    """The sidecar caption of a manifest row, or None."""
    source = Path(row["source_path"])
    if mapping:
        for key in (row["clip_id"], str(source), source.name, source.stem):
            if key in mapping:
                return mapping[key]
    text_file = source.with_suffix(".txt")
    if text_file.is_file():
        return text_file.read_text(encoding="utf-8").strip() or None
    return None


# ----------------------------------------------------------------------------------------------
# Manifest stage


def clip_frames(row: dict, manifest_dir: Path, config: CaptionConfig) -> list[np.ndarray]:
    """Upright RGB frames sampled from a clip, short side at most `config.frame_short_side`:
    from its written MP4 when there is one (already upright), else from the source range."""
    import cv2

    from mugen.data.curation.decode import read_frames

    offsets = caption_frame_indices(int(row["num_frames"]), config.frames_per_clip)
    if row.get("clip_path"):
        path, first, quarter_turns = manifest_dir / row["clip_path"], 0, 0
    else:
        path, first = Path(row["source_path"]), int(row["start_frame"])
        quarter_turns = (int(row.get("rotation") or 0) // 90) % 4  # decoded frames are stored sideways
    decoded = read_frames(path, float(row["fps"]), [first + offset for offset in offsets], pixel_format="rgb24")
    frames = []
    for offset in offsets:
        frame = decoded.get(first + offset)
        if frame is None:
            continue
        scale = config.frame_short_side / min(frame.shape[:2])
        if scale < 1:
            frame = cv2.resize(frame, (round(frame.shape[1] * scale), round(frame.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        frames.append(np.ascontiguousarray(np.rot90(frame, k=quarter_turns)) if quarter_turns else frame)
    return frames


def caption_rows(
    rows: list[dict],
    manifest_dir: str | os.PathLike,
    captioner: QwenVLCaptioner | None = None,
    mapping: dict[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    only_kept: bool = True,
) -> dict[str, int]:
    """Fill `caption` / `caption_source` in place. Sidecars first; the VLM captions the rest.

    `cache_dir`: VLM captions are saved there per video (`<video_id>.json`, atomically) as soon as
    all of that video's clips are done, and reused, so a killed run does not caption them again.
    Returns counts {"sidecar", "vlm", "cached", "uncaptioned", "failed"}."""
    from tqdm import tqdm

    manifest_dir = Path(manifest_dir)
    counts = {"sidecar": 0, "vlm": 0, "cached": 0, "uncaptioned": 0, "failed": 0}
    todo: list[dict] = []
    for row in rows:
        if only_kept and not row.get("passed_filters", True):
            continue
        text = sidecar_caption(row, mapping)
        if text:
            row["caption"], row["caption_source"] = text, "sidecar"
            counts["sidecar"] += 1
        elif captioner is not None:
            todo.append(row)
    considered = [row for row in rows if not only_kept or row.get("passed_filters", True)]
    if not todo:
        counts["uncaptioned"] = sum(1 for row in considered if not row.get("caption"))
        return counts
    cache = Path(cache_dir) if cache_dir is not None else None
    by_video: dict[str, list[dict]] = {}
    for row in todo:
        by_video.setdefault(row["video_id"], []).append(row)
    pending: list[dict] = []
    for video_id, video_rows in by_video.items():
        cached = _read_cache(cache, video_id)
        if cached is not None and all(row["clip_id"] in cached for row in video_rows):
            for row in video_rows:
                row["caption"], row["caption_source"] = cached[row["clip_id"]], "vlm"
            counts["cached"] += len(video_rows)
        else:
            pending += video_rows
    remaining = {video_id: sum(1 for row in pending if row["video_id"] == video_id) for video_id in by_video}
    batch_size = captioner.config.batch_size
    progress = tqdm(total=len(pending), desc="captions", unit="clip")
    for start in range(0, len(pending), batch_size):
        batch, frames = [], []
        for row in pending[start : start + batch_size]:
            try:
                sampled = clip_frames(row, manifest_dir, captioner.config)
            except MugenError as error:  # one unreadable clip never stops the stage
                logger.warning("clip %s: no frames for captioning (%s)", row["clip_id"], error)
                sampled = []
            if sampled:
                batch.append(row)
                frames.append(sampled)
            else:
                counts["failed"] += 1
                remaining[row["video_id"]] -= 1
        for row, text in zip(batch, captioner(frames) if frames else []):
            row["caption"], row["caption_source"] = text, "vlm"
            counts["vlm"] += 1
            remaining[row["video_id"]] -= 1
            if cache is not None and remaining[row["video_id"]] == 0:
                done = {r["clip_id"]: r["caption"] for r in by_video[row["video_id"]] if r.get("caption_source") == "vlm"}
                write_text_atomically(cache / f"{row['video_id']}.json", json.dumps(done))
        progress.update(len(pending[start : start + batch_size]))
    progress.close()
    counts["uncaptioned"] = sum(1 for row in considered if not row.get("caption"))
    return counts


def _read_cache(cache: Path | None, video_id: str) -> dict[str, str] | None:
    if cache is None or not (cache / f"{video_id}.json").is_file():
        return None
    try:
        return json.loads((cache / f"{video_id}.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
