"""Decoding for curation: only the frames a stage needs, at the resolution it needs (seed §2.1).

Curation touches every raw video once or twice, so decoding dominates its cost. Three habits keep
it cheap, and every stage goes through this module to get them:

- scale in the decoder: FFmpeg's swscale resizes (area filter) and converts the pixel format in
  one step (`frame.reformat(width, height, format)`), so a 1080p frame never becomes a full-size
  RGB array when the stage wants a 256x144 grey thumbnail;
- decode only what is needed: `iter_frames` streams a range and stops at its end; `read_frames`
  gathers sparse frames, seeking to the keyframe before a wanted frame when that is cheaper than
  decoding forward to it;
- bounded memory: frames are yielded one at a time; nothing holds a whole video.

Frames keep the orientation they are stored in (a rotated phone video is analysed sideways);
every curation score is invariant to a quarter turn, so no rotation pass is spent on them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import av
import numpy as np

from mugen.data.curation.probe import CurationReject

# Pixel formats a stage may ask for: grey (H, W), packed BGR for OpenCV or RGB for CLIP (H, W, 3).
PIXEL_FORMATS = ("gray", "bgr24", "rgb24")

# swscale filter used to shrink frames: area averaging anti-aliases like cv2.INTER_AREA.
_SCALE_INTERPOLATION = "AREA"


def size_for_short_side(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to `short_side`, aspect kept, both even."""
    if short_side < 2:
        raise ValueError(f"short_side={short_side} must be at least 2")
    scale = short_side / min(width, height)
    new_width = max(2, int(round(width * scale / 2)) * 2)
    new_height = max(2, int(round(height * scale / 2)) * 2)
    return new_width, new_height


@contextmanager
def open_video_stream(path: str | os.PathLike, threads: int = 0, skip_loop_filter: bool = False):
    """Open `path` for decoding; yield (container, stream). `threads=0` lets FFmpeg pick (frame +
    slice threading, as many threads as the process may use cores). `skip_loop_filter` skips the
    H.264/HEVC deblocking filter on non-reference frames only (no drift: reference frames stay
    exact), for stages that look at heavily shrunk frames."""
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError) as error:
        raise CurationReject(path, "unreadable", f"FFmpeg cannot open it ({error})") from None
    try:
        if not container.streams.video:
            raise CurationReject(path, "no_video_stream", "the file holds no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = int(threads)
        if skip_loop_filter:
            stream.codec_context.options = {"skip_loop_filter": "noref"}
        yield container, stream
    finally:
        container.close()


class _FrameIndexer:
    """Maps a decoded frame's presentation timestamp to its frame number."""

    def __init__(self, stream, fps: float):
        self.time_base = float(stream.time_base) if stream.time_base else 0.0
        self.start = stream.start_time or 0
        self.fps = fps
        self._scale = self.time_base * fps  # frames per timestamp tick

    def index(self, frame, fallback: int) -> int:
        pts = frame.pts
        if pts is None or self._scale == 0.0:
            return fallback
        return int(round((pts - self.start) * self._scale))

    def timestamp(self, frame_index: int) -> int:
        return int(self.start + frame_index / self.fps / self.time_base)


def _convert(frame, size: tuple[int, int] | None, pixel_format: str) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format=pixel_format)
    width, height = size
    return frame.reformat(width, height, pixel_format, interpolation=_SCALE_INTERPOLATION).to_ndarray()


def _check_format(pixel_format: str) -> None:
    if pixel_format not in PIXEL_FORMATS:
        raise ValueError(f"pixel_format={pixel_format!r} must be one of {PIXEL_FORMATS}")


def iter_video_frames(
    path: str | os.PathLike,
    fps: float,
    start_frame: int = 0,
    end_frame: int | None = None,
    threads: int = 0,
    skip_loop_filter: bool = False,
) -> Iterator[tuple[int, "av.VideoFrame"]]:
    """Yield (frame_index, decoded av.VideoFrame) for frames in [start_frame, end_frame), not yet
    converted: the caller scales each one to what it needs (`convert_frame`). Seeks to the keyframe
    before `start_frame` when it is not 0, and stops decoding at `end_frame`."""
    with open_video_stream(path, threads=threads, skip_loop_filter=skip_loop_filter) as (container, stream):
        indexer = _FrameIndexer(stream, fps)
        counter = 0
        if start_frame > 0:
            container.seek(indexer.timestamp(start_frame), backward=True, any_frame=False, stream=stream)
            counter = None  # unknown after a seek: trust timestamps
        try:
            for frame in container.decode(stream):
                index = indexer.index(frame, counter if counter is not None else start_frame)
                if counter is not None:
                    counter += 1
                if index < start_frame:
                    continue
                if end_frame is not None and index >= end_frame:
                    break
                yield index, frame
        except av.FFmpegError as error:
            raise CurationReject(path, "unreadable", f"decoding failed ({error})") from None


def convert_frame(frame, size: tuple[int, int] | None, pixel_format: str) -> np.ndarray:
    """A decoded frame -> array at `size` = (width, height) in `pixel_format`, scaled inside FFmpeg."""
    _check_format(pixel_format)
    return _convert(frame, size, pixel_format)


def iter_frames(
    path: str | os.PathLike,
    fps: float,
    start_frame: int = 0,
    end_frame: int | None = None,
    size: tuple[int, int] | None = None,
    pixel_format: str = "gray",
    threads: int = 0,
    skip_loop_filter: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (frame_index, array) for frames in [start_frame, end_frame) in order, each scaled to
    `size` = (width, height) and converted to `pixel_format` inside FFmpeg. Seeks to the keyframe
    before `start_frame` when it is not 0, and stops decoding at `end_frame`."""
    _check_format(pixel_format)
    for index, frame in iter_video_frames(path, fps, start_frame, end_frame, threads, skip_loop_filter):
        yield index, _convert(frame, size, pixel_format)


def keyframe_indices(path: str | os.PathLike, fps: float) -> list[int]:
    """Frame numbers of the keyframes, read by demuxing packets (no decoding). Cached per file
    version, so scoring many clips of one long video demuxes it once."""
    stat = Path(path).stat()
    return list(_keyframe_indices(str(path), stat.st_mtime_ns, stat.st_size, float(fps)))


@lru_cache(maxsize=64)
def _keyframe_indices(path: str, mtime_ns: int, size: int, fps: float) -> tuple[int, ...]:
    with open_video_stream(path) as (container, stream):
        indexer = _FrameIndexer(stream, fps)
        keys = []
        for packet in container.demux(stream):
            if packet.is_keyframe and packet.pts is not None:
                keys.append(int(round((packet.pts - indexer.start) * indexer.time_base * fps)))
    return tuple(sorted(keys))


def read_frames(
    path: str | os.PathLike,
    fps: float,
    indices: Iterable[int],
    size: tuple[int, int] | None = None,
    pixel_format: str = "gray",
    threads: int = 0,
) -> dict[int, np.ndarray]:
    """Decode just the frames `indices` (any order, duplicates fine) -> {index: array}.

    One forward sweep: between two wanted frames it keeps decoding when no keyframe lies in
    between (a seek would land on an earlier keyframe and decode the same frames again), and
    seeks when one does (the seek skips everything before that keyframe). Only wanted frames are
    scaled and converted. A wanted frame past the end of the stream is missing from the result.
    """
    _check_format(pixel_format)
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return {}
    if wanted[0] < 0:
        raise ValueError(f"frame indices must be >= 0, got {wanted[0]}")
    keys = np.asarray(keyframe_indices(path, fps) or [0])
    result: dict[int, np.ndarray] = {}
    with open_video_stream(path, threads=threads) as (container, stream):
        indexer = _FrameIndexer(stream, fps)
        position = -1  # index of the last decoded frame (-1: nothing decoded yet)
        frames = None
        try:
            for target in wanted:
                if target in result:
                    continue
                key_before = int(keys[np.searchsorted(keys, target, side="right") - 1])
                if frames is None or target <= position or key_before > position + 1:
                    container.seek(indexer.timestamp(key_before), backward=True, any_frame=False, stream=stream)
                    frames = container.decode(stream)
                    position = key_before - 1
                for frame in frames:
                    position = indexer.index(frame, position + 1)
                    if position == target:
                        result[target] = _convert(frame, size, pixel_format)
                        break
                    if position > target:  # timestamps skipped over it (variable frame rate)
                        break
                else:
                    break  # end of stream
        except av.FFmpegError as error:
            raise CurationReject(path, "unreadable", f"decoding failed near frame {position} ({error})") from None
    return result
