"""`mugen encode`: videos (+ captions) -> VAE latents and text features on disk, plus a manifest.

Output folder layout::

    out/latents/<sample_id>.safetensors     {"latents": (C, 1 + k, h, w)} normalised latents
    out/text/<sample_id>.safetensors        {"states": (L, D), "mask": (L,)} caption features
    out/null_text.safetensors               features of the empty prompt (classifier-free guidance)
    out/manifest.parquet                    one row per sample (mugen.data.manifest)
    out/rejections.jsonl                    inputs that were skipped, with the reason

A bad input (unreadable video, too few frames, no caption) is skipped and logged; the run goes on.
The manifest is written atomically at the end, so a manifest on disk always lists complete samples.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from mugen.data.datasets import save_latent
from mugen.data.manifest import ManifestRow, write_manifest
from mugen.atomic import write_text_atomically
from mugen.errors import MugenError
from mugen.models.text.base import TextEncoder, save_text_features
from mugen.models.vae.frames import encode_clip, latent_frames_for

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class EncodeSample:
    """One clip (or image) in memory, ready to encode."""

    sample_id: str
    source: str
    video: Tensor  # (3, 1 + 8k, H, W) in [-1, 1]; images have one frame
    caption: str
    fps: float
    kind: str = "video"  # "video" | "image"


@dataclass
class SourceItem:
    """A file to encode and its caption."""

    path: Path
    caption: str


def _caption_beside(path: Path) -> str:
    sidecar = path.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""


def list_sources(input_path: str | os.PathLike) -> list[SourceItem]:
    """A folder of videos/images (captions in ``<name>.txt`` beside each) or a caption table.

    Tables: ``.csv`` or ``.jsonl`` with columns ``path`` and ``caption`` (paths relative to the table).
    """
    from mugen.data.video_io import VIDEO_EXTENSIONS

    input_path = Path(input_path)
    if not input_path.exists():
        raise MugenError(f"input {input_path} does not exist; give a folder of videos or a .csv/.jsonl with path,caption")
    if input_path.is_dir():
        media = sorted(
            p for p in input_path.rglob("*") if p.suffix.lower() in (*VIDEO_EXTENSIONS, *IMAGE_EXTENSIONS) and p.is_file()
        )
        if not media:
            raise MugenError(f"input folder {input_path} holds no videos or images ({', '.join(VIDEO_EXTENSIONS)})")
        return [SourceItem(p, _caption_beside(p)) for p in media]
    if input_path.suffix.lower() == ".csv":
        with open(input_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif input_path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in input_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise MugenError(f"input {input_path}: expected a folder, a .csv or a .jsonl with columns path,caption")
    if rows and "path" not in rows[0]:
        raise MugenError(f"input table {input_path} has no 'path' column; it needs columns path,caption")
    return [SourceItem((input_path.parent / row["path"]).resolve(), str(row.get("caption") or "")) for row in rows]


def clips_from_sources(
    sources: Iterable[SourceItem],
    num_frames: int,
    size: tuple[int, int],
    clips_per_video: int = 1,
    frame_stride: int = 1,
    rejections: list[dict] | None = None,
) -> Iterator[EncodeSample]:
    """Read clips of ``num_frames`` (1 + 8k) frames at ``size`` from each source; skip and log failures."""
    from mugen.data.video_io import probe_video, read_image, read_video

    latent_frames_for(num_frames, "--num-frames")
    rejections = rejections if rejections is not None else []
    for item in sources:
        stem = item.path.stem
        try:
            if not item.caption:
                raise MugenError(f"{item.path} has no caption (add {item.path.with_suffix('.txt').name} or a caption column)")
            if item.path.suffix.lower() in IMAGE_EXTENSIONS:
                image = read_image(item.path, size)  # (3, H, W)
                yield EncodeSample(f"{stem}", str(item.path), image[:, None], item.caption, 0.0, kind="image")
                continue
            info = probe_video(item.path)
            span = (num_frames - 1) * frame_stride + 1
            if info.num_frames < span:
                raise MugenError(f"{item.path} has {info.num_frames} frames; {span} are needed for --num-frames {num_frames}")
            starts = torch.linspace(0, info.num_frames - span, clips_per_video).round().long().unique().tolist()
            for clip_index, start in enumerate(starts):
                video, fps = read_video(item.path, num_frames=num_frames, start_frame=int(start), size=size, frame_stride=frame_stride)
                yield EncodeSample(f"{stem}-{clip_index:03d}", str(item.path), video, item.caption, fps)
        except MugenError as error:
            log.warning("skipping %s: %s", item.path, error)
            rejections.append({"source": str(item.path), "reason": str(error)})


def encode_samples(
    samples: Iterable[EncodeSample],
    vae,
    text_encoder: TextEncoder,
    output_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    rejections: list[dict] | None = None,
    total: int | None = None,
) -> Path:
    """Encode samples one by one into ``output_dir``; returns the manifest path.

    ``vae``: a VAE model, or a path for ``mugen.models.vae.loading.load_vae`` (a mugen VAE folder or
    the released ``vae.pt``).
    """
    if isinstance(vae, (str, os.PathLike)):
        from mugen.models.vae.loading import load_vae

        vae = load_vae(vae, device=device)
    output_dir = Path(output_dir)
    (output_dir / "latents").mkdir(parents=True, exist_ok=True)
    (output_dir / "text").mkdir(parents=True, exist_ok=True)
    rejections = rejections if rejections is not None else []
    vae = vae.to(device).eval()
    null = text_encoder.encode([""], allow_empty=True)
    save_text_features(output_dir / "null_text.safetensors", null.states[0], null.mask[0])

    rows: list[ManifestRow] = []
    seen: set[str] = set()
    for sample in tqdm(samples, total=total, desc="encode", unit="clip"):
        try:
            if sample.sample_id in seen:
                raise MugenError(f"duplicate sample id {sample.sample_id}")
            video = sample.video
            _, frames, height, width = video.shape
            if height % 16 or width % 16:
                raise MugenError(f"{sample.source}: size {height}x{width} is not divisible by 16; pick --size with multiples of 16")
            with torch.no_grad():
                latents = encode_clip(vae, video[None].to(device))[0].float().cpu()  # (C, 1 + k, h, w)
                text = text_encoder.encode([sample.caption])
            latent_path = output_dir / "latents" / f"{sample.sample_id}.safetensors"
            text_path = output_dir / "text" / f"{sample.sample_id}.safetensors"
            save_latent(latent_path, latents)
            save_text_features(text_path, text.states[0].float().cpu(), text.mask[0].cpu())
        except MugenError as error:
            log.warning("skipping %s: %s", sample.sample_id, error)
            rejections.append({"source": sample.source, "sample_id": sample.sample_id, "reason": str(error)})
            continue
        seen.add(sample.sample_id)
        rows.append(
            ManifestRow(
                sample_id=sample.sample_id,
                source=sample.source,
                latent_path=str(latent_path),
                text_feat_path=str(text_path),
                caption=sample.caption,
                kind=sample.kind,
                num_frames=frames,
                height=height,
                width=width,
                latent_frames=latents.shape[1],
                latent_height=latents.shape[2],
                latent_width=latents.shape[3],
                fps=float(sample.fps),
            )
        )
    if not rows:
        raise MugenError(f"nothing was encoded into {output_dir}: every input was rejected (see the warnings above)")
    manifest = write_manifest(output_dir / "manifest.parquet", rows)
    _write_rejections(output_dir / "rejections.jsonl", rejections)
    return manifest


def _write_rejections(path: Path, rejections: list[dict]) -> None:
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in rejections))
