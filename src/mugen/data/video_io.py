"""Video and image decoding/encoding with PyAV (FFmpeg), plus resizing and contact sheets.

Conventions (DESIGN.md): a video is a float tensor `(3, T, H, W)` in [-1, 1] (callers add the
batch dim); an image is `(3, H, W)`. Decoding streams frames and stops as soon as the requested
frames are in hand, so reading 16 frames of a long 1080p file costs 16 frames, not the file.

Rotation: phone videos store frames sideways plus a display matrix. `probe_video` reports the
display rotation and the *displayed* width/height; `read_video` returns frames upright, the way a
player shows them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mugen.data import write_atomically
from mugen.errors import MugenError

VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv",
)
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

# Container formats `write_video` can produce, keyed by file suffix.
_WRITE_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}


@dataclass
class VideoInfo:
    """What `probe_video` learns from a file's headers and its first frame."""

    path: str
    num_frames: int
    fps: float
    width: int  # as displayed (after rotation)
    height: int  # as displayed (after rotation)
    codec: str
    duration: float  # seconds
    rotation: int  # counter-clockwise display rotation in degrees: 0, 90, 180 or 270


# ----------------------------------------------------------------------------------------------
# Opening and checking a file


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise MugenError(f"{what} '{path}' not found; check the path")
    if path.is_dir():
        raise MugenError(f"{what} '{path}' is a directory; pass a file instead")


def _unreadable(path: Path, reason: str) -> MugenError:
    return MugenError(
        f"video '{path}' is unreadable or corrupt ({reason}); check that it plays, or re-encode it"
    )


@contextmanager
def _open_video(path: Path) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """Open `path`, check that it holds a complete video stream, and yield (container, stream)."""
    _check_exists(path, "video")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as error:
        raise _unreadable(path, f"FFmpeg cannot open it: {error}") from None
    try:
        if not container.streams.video:
            raise _unreadable(path, "it has no video stream")
        stream = container.streams.video[0]
        # An MP4/MOV index lists where every frame's bytes live; bytes past the end of the
        # file mean it was cut short (an interrupted copy or download).
        entries = stream.index_entries
        if len(entries) > 0:
            last = entries[len(entries) - 1]
            if last.pos + last.size > path.stat().st_size:
                raise _unreadable(path, "the file is truncated")
        yield container, stream
    finally:
        container.close()


def _frame_rate(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _upright_rgb(frame: av.VideoFrame) -> np.ndarray:
    """Decoded frame -> (H, W, 3) uint8 RGB, rotated the way a player displays it."""
    rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3)
    quarter_turns = (frame.rotation // 90) % 4
    if quarter_turns:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=quarter_turns))  # counter-clockwise turns
    return rgb


def _uint8_to_unit(rgb: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video's headers and decode its first frame to prove it is a readable video."""
    path = Path(path)
    with _open_video(path) as (container, stream):
        stream.thread_type = "AUTO"
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as error:
            raise _unreadable(path, f"decoding failed: {error}") from None
        if first is None:
            raise _unreadable(path, "it has zero decodable frames")
        fps = _frame_rate(stream)
        num_frames = stream.frames or _count_frames(path)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = num_frames / fps if fps > 0 else 0.0
        rotation = int(first.rotation) % 360
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        return VideoInfo(
            path=str(path),
            num_frames=int(num_frames),
            fps=fps,
            width=int(width),
            height=int(height),
            codec=stream.codec_context.name,
            duration=duration,
            rotation=rotation,
        )


def _count_frames(path: Path) -> int:
    """Count video packets by demuxing (no decoding), for containers without a frame count."""
    with _open_video(path) as (container, stream):
        try:
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.FFmpegError as error:
            raise _unreadable(path, f"demuxing failed: {error}") from None


# ----------------------------------------------------------------------------------------------
# Resizing


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise MugenError(f"size {tuple(size)} is not a (height, width) pair of positive integers")
    return int(size[0]), int(size[1])


def resize_center_crop(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """Scale so the frame covers `size` = (H, W) (the short side, relative to the target aspect,
    fits exactly), then cut the centre. Works on (3, T, H, W) videos and (3, H, W) images.

    Downscaling uses antialiased bilinear filtering so thin details do not alias.
    """
    out_h, out_w = _check_size(size)
    if frames.dim() not in (3, 4) or frames.shape[0] != 3:
        raise ValueError(f"expected (3, H, W) or (3, T, H, W) frames, got {tuple(frames.shape)}")
    is_image = frames.dim() == 3
    stack = frames.unsqueeze(1) if is_image else frames  # (3, T, H, W)
    in_h, in_w = stack.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return frames
    scale = max(out_h / in_h, out_w / in_w)
    scaled_h = max(out_h, round(in_h * scale))
    scaled_w = max(out_w, round(in_w * scale))
    batch = stack.permute(1, 0, 2, 3).float()  # (T, 3, H, W)
    if (scaled_h, scaled_w) != (in_h, in_w):
        batch = F.interpolate(
            batch, size=(scaled_h, scaled_w), mode="bilinear", align_corners=False, antialias=True
        )  # (T, 3, scaled_h, scaled_w)
    top = (scaled_h - out_h) // 2
    left = (scaled_w - out_w) // 2
    batch = batch[:, :, top : top + out_h, left : left + out_w]  # (T, 3, out_h, out_w)
    result = batch.permute(1, 0, 2, 3).clamp(-1.0, 1.0).to(frames.dtype)  # (3, T, out_h, out_w)
    return result[:, 0] if is_image else result.contiguous()


# ----------------------------------------------------------------------------------------------
# Reading


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    start_frame: int = 0,
    size: tuple[int, int] | None = None,
    frame_stride: int = 1,
) -> tuple[Tensor, float]:
    """Decode frames `start_frame, start_frame + frame_stride, ...` of a video.

    Returns the clip (3, T, H, W) in [-1, 1] and its frame rate (the file's fps / frame_stride).
    `num_frames=None` reads to the end. With `size=(H, W)` each frame is resized (cover) and
    centre-cropped as it is decoded, so memory holds only small frames. Decoding stops as soon as
    the last wanted frame is out.
    """
    path = Path(path)
    if num_frames is not None and num_frames < 1:
        raise MugenError(f"num_frames={num_frames} for '{path}' must be at least 1 (or None for all)")
    if start_frame < 0:
        raise MugenError(f"start_frame={start_frame} for '{path}' must be 0 or more")
    if frame_stride < 1:
        raise MugenError(f"frame_stride={frame_stride} for '{path}' must be at least 1")
    if size is not None:
        size = _check_size(size)

    frames: list[Tensor] = []
    with _open_video(path) as (container, stream):
        stream.thread_type = "AUTO"
        fps = _frame_rate(stream)
        decoded = 0
        try:
            for frame in container.decode(stream):
                index = decoded
                decoded += 1
                if index < start_frame or (index - start_frame) % frame_stride:
                    continue
                image = _uint8_to_unit(_upright_rgb(frame))  # (3, H, W)
                if size is not None:
                    image = resize_center_crop(image, size)  # (3, size_h, size_w)
                frames.append(image)
                if num_frames is not None and len(frames) == num_frames:
                    break
        except av.FFmpegError as error:
            raise _unreadable(path, f"decoding failed at frame {decoded}: {error}") from None

    if decoded == 0:
        raise _unreadable(path, "it has zero decodable frames")
    if not frames or (num_frames is not None and len(frames) < num_frames):
        wanted = "at least one frame" if num_frames is None else f"{num_frames} frames"
        raise MugenError(
            f"video '{path}' has {decoded} frames, too few for {wanted} from start_frame="
            f"{start_frame} with frame_stride={frame_stride}; ask for fewer frames or an earlier start"
        )
    video = torch.stack(frames, dim=1)  # (3, T, H, W)
    return video, fps / frame_stride


def read_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Tensor:
    """Read a still image as (3, H, W) RGB in [-1, 1]; with `size`, resize (cover) + centre-crop."""
    path = Path(path)
    _check_exists(path, "image")
    data = np.fromfile(path, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None  # (H, W, 3) uint8, alpha dropped
    if bgr is None:
        raise MugenError(
            f"image '{path}' is unreadable or corrupt; use a PNG/JPEG/BMP/WebP/TIFF file that opens"
        )
    image = _uint8_to_unit(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))  # (3, H, W)
    return resize_center_crop(image, size) if size is not None else image


# ----------------------------------------------------------------------------------------------
# Writing


def video_to_uint8(video: Tensor | np.ndarray) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] -> (T, H, W, 3) uint8 (values outside [-1, 1] are clipped)."""
    video = torch.as_tensor(video)
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) video, got shape {tuple(video.shape)}")
    scaled = (video.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5
    return scaled.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()  # (T, H, W, 3)


def write_video(path: str | os.PathLike, video: Tensor, fps: float, crf: int = 18) -> Path:
    """Encode a (3, T, H, W) video in [-1, 1] as H.264 (libx264, yuv420p) in an MP4/MOV/MKV file.

    yuv420p needs even width and height: an odd size is padded by repeating the last row/column,
    so the file is at most one pixel taller/wider than the tensor. The file appears atomically.
    """
    path = Path(path)
    container_format = _WRITE_FORMATS.get(path.suffix.lower())
    if container_format is None:
        raise MugenError(
            f"cannot write video '{path}': use one of the suffixes {', '.join(_WRITE_FORMATS)}"
        )
    if not (fps > 0 and math.isfinite(fps)):
        raise MugenError(f"fps={fps} for '{path}' must be a positive number")
    if not 0 <= crf <= 51:
        raise MugenError(f"crf={crf} for '{path}' must be in [0, 51] (lower is better quality)")
    frames = video_to_uint8(video)  # (T, H, W, 3)
    height, width = frames.shape[1:3]
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(10_000)

    def encode(target: Path) -> None:
        options = {"movflags": "+faststart"} if container_format in ("mp4", "mov") else {}
        with av.open(str(target), mode="w", format=container_format, options=options) as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = 1 / rate
            stream.options = {"crf": str(int(crf)), "preset": "medium"}
            for index, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = index
                container.mux(stream.encode(frame))
            container.mux(stream.encode())  # flush delayed frames

    return write_atomically(path, encode)


_LABEL_BAND_HEIGHT = 18  # pixels of caption strip above the grid when a label is given
_CONTACT_SHEET_COLUMNS = 4


def contact_sheet_frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """Evenly spaced frame indices, first and last included, at most `max_frames` of them."""
    count = max(1, min(num_frames, max_frames))
    return sorted({round(i * (num_frames - 1) / max(count - 1, 1)) for i in range(count)})


def write_contact_sheet(
    path: str | os.PathLike, video: Tensor, max_frames: int = 8, label: str | None = None
) -> Path:
    """Save evenly spaced frames of a (3, T, H, W) video as a PNG grid (4 columns, row-major).

    Frames touch (no gutters); with `label`, an 18-pixel strip with the text sits on top.
    """
    path = Path(path)
    if max_frames < 1:
        raise MugenError(f"max_frames={max_frames} for contact sheet '{path}' must be at least 1")
    frames = video_to_uint8(video)  # (T, H, W, 3)
    picked = frames[contact_sheet_frame_indices(len(frames), max_frames)]  # (N, H, W, 3)
    count, height, width = picked.shape[:3]
    columns = min(count, _CONTACT_SHEET_COLUMNS)
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for i, frame in enumerate(picked):
        row, column = divmod(i, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = frame
    if label:
        band = np.zeros((_LABEL_BAND_HEIGHT, grid.shape[1], 3), dtype=np.uint8)
        cv2.putText(band, label, (2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        grid = np.concatenate([band, grid], axis=0)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode the contact sheet for '{path}'")
    return write_atomically(path, lambda target: target.write_bytes(encoded.tobytes()))
