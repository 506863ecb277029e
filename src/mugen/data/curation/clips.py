"""Clip output: H.264 MP4 files, or references into the source video (seed §2.1).

`write_clip` streams frames [start_frame, end_frame) of the source through the decoder
(`decode.iter_frames`, one frame in memory at a time), turns them upright (the source's rotation
is applied, so players and training see the picture the right way up), optionally shrinks them so
the short side is at most `max_short_side` (inside FFmpeg), and encodes them with libx264
(yuv420p, `crf`, `preset`) at the source frame rate. The file appears atomically under
`clips/<video_id>/<clip_id>.mp4`, so a killed run leaves no half-written clip, and a re-run
overwrites the same name (no duplicates).

`--references` writes no files: the manifest's `source_path` + `start_frame`/`end_frame` say where
the clip lies, and `clip_path` stays "".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from mugen.atomic import write_atomically
from mugen.data.curation.decode import iter_frames, size_for_short_side
from mugen.errors import MugenError

CLIP_MODES = ("write", "references")


@dataclass
class ClipOutputConfig:
    mode: str = "write"  # "write": H.264 MP4 files; "references": source path + frame range only
    crf: int = 20  # x264 constant rate factor (lower = better, larger files)
    preset: str = "veryfast"  # x264 speed/size trade-off
    max_short_side: int | None = None  # shrink clips whose short side is larger (None = keep size)

    def __post_init__(self) -> None:
        if self.mode not in CLIP_MODES:
            raise MugenError(f"clip output mode {self.mode!r} is unknown; use one of {CLIP_MODES}")
        if not 0 <= self.crf <= 51:
            raise MugenError(f"clip crf {self.crf} must lie in [0, 51] (lower is better quality)")
        if self.max_short_side is not None and self.max_short_side < 16:
            raise MugenError(f"clip max_short_side {self.max_short_side} must be at least 16 pixels, or null")


def clip_relative_path(video_id: str, clip_id: str) -> str:
    return f"clips/{video_id}/{clip_id}.mp4"


def _output_size(stored_width: int, stored_height: int, max_short_side: int | None) -> tuple[int, int] | None:
    """Decoder output size (stored orientation), even sides; None = decode at the stored size
    when it is already even and needs no shrinking."""
    if max_short_side is not None and min(stored_width, stored_height) > max_short_side:
        return size_for_short_side(stored_width, stored_height, max_short_side)
    if stored_width % 2 or stored_height % 2:
        return stored_width - stored_width % 2, stored_height - stored_height % 2
    return None


def write_clip(
    source_path: str | os.PathLike,
    target: str | os.PathLike,
    fps: float,
    start_frame: int,
    end_frame: int,
    stored_size: tuple[int, int],
    rotation: int,
    config: ClipOutputConfig,
) -> int:
    """Encode frames [start_frame, end_frame) of `source_path` into `target` (H.264 MP4);
    `stored_size` = (width, height) as decoded (before rotation). Returns frames written."""
    size = _output_size(*stored_size, config.max_short_side)
    quarter_turns = (rotation // 90) % 4
    rate = Fraction(fps).limit_denominator(10_000)
    written = 0

    def encode(temporary: Path) -> None:
        nonlocal written
        with av.open(str(temporary), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = None
            for index, rgb in iter_frames(source_path, fps, start_frame, end_frame, size=size, pixel_format="rgb24"):
                if quarter_turns:
                    rgb = np.ascontiguousarray(np.rot90(rgb, k=quarter_turns))  # counter-clockwise turns
                if stream is None:
                    stream = container.add_stream("libx264", rate=rate)
                    stream.height, stream.width = rgb.shape[:2]
                    stream.pix_fmt = "yuv420p"
                    stream.codec_context.time_base = 1 / rate
                    stream.options = {"crf": str(int(config.crf)), "preset": config.preset}
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = index - start_frame
                container.mux(stream.encode(frame))
                written += 1
            if stream is None:
                raise MugenError(f"video '{source_path}': frames {start_frame}-{end_frame} decode to nothing; the clip cannot be written")
            container.mux(stream.encode())  # flush delayed frames

    write_atomically(target, encode)
    return written
