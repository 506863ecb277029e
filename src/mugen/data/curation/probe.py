"""Stage 1 of curation: probe a raw file and decide whether it is a usable video (seed §2.1).

`probe_video` reads the container headers with PyAV, checks the file is complete, and decodes the
first frame to prove the stream is real. Anything unusable raises `CurationReject` with a short
machine `reason` code (for the rejections table) and a human message; a curation run records it
and goes on with the next file.

Reason codes:
    missing          the path does not exist (or is a directory)
    zero_length      the file is empty
    not_video        FFmpeg does not recognise the bytes as any media container
    still_image      a single picture (PNG, JPEG, ...) rather than a video
    no_video_stream  a media file without a video stream (e.g. audio only)
    truncated        the container says data lies past the end of the file (an interrupted copy)
    unreadable       a recognised container that FFmpeg fails to open or decode
    no_frames        the video stream holds no decodable frame
    bad_frame_rate   the stream has no usable frame rate
"""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import av

from mugen.errors import MugenError

# FFmpeg demuxers that read single still pictures; a file opened by one of these is an image.
_IMAGE_DEMUXER_SUFFIXES = ("_pipe", "image2")
_IMAGE_CODECS = frozenset({"png", "mjpeg", "bmp", "gif", "webp", "tiff", "jpeg2000", "jpegls", "pam", "ppm"})


class CurationReject(MugenError):
    """A raw file that curation skips. `.reason` is a short code (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, reason: str, message: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"video '{path}' rejected ({reason}): {message}")


@dataclass(frozen=True)
class VideoProbe:
    """What curation knows about a raw video before decoding it.

    `width`/`height` are the *displayed* size (after `rotation`, counter-clockwise degrees in
    {0, 90, 180, 270}); decoded frames are stored sideways when rotation is 90 or 270.
    """

    path: str
    duration_s: float
    fps: float
    num_frames: int
    width: int
    height: int
    codec: str
    rotation: int

    def to_dict(self) -> dict:
        return asdict(self)


def _iso_bmff_truncated(path: Path, file_size: int) -> bool | None:
    """Walk the top-level boxes of an MP4/MOV file. True when a box runs past the end of the file
    or the `moov` index is missing; None when the file is not ISO-BMFF."""
    with path.open("rb") as handle:
        head = handle.read(12)
        if len(head) < 12 or head[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
            return None
        offset, seen_moov = 0, False
        while offset < file_size:
            handle.seek(offset)
            header = handle.read(16)
            if len(header) < 8:
                return True
            size, kind = struct.unpack(">I4s", header[:8])
            if size == 1:  # 64-bit size follows the type
                if len(header) < 16:
                    return True
                size = struct.unpack(">Q", header[8:16])[0]
            elif size == 0:  # box extends to the end of the file
                size = file_size - offset
            if size < 8 or offset + size > file_size:
                return True
            seen_moov |= kind == b"moov"
            offset += size
        return not seen_moov


def _frame_rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe_video(path: str | os.PathLike) -> VideoProbe:
    """Probe `path` (headers + first decoded frame); raise `CurationReject` for an unusable file."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise CurationReject(path, "missing", "no such file; check the path")
    file_size = path.stat().st_size
    if file_size == 0:
        raise CurationReject(path, "zero_length", "the file is empty (0 bytes); re-copy it")
    truncated = _iso_bmff_truncated(path, file_size)
    if truncated:
        raise CurationReject(
            path, "truncated", f"the MP4/MOV structure runs past the end of the file ({file_size} bytes); re-copy it"
        )
    try:
        container = av.open(str(path), mode="r")
    except av.InvalidDataError:
        raise CurationReject(path, "not_video", "FFmpeg does not recognise it as a media file") from None
    except (av.FFmpegError, OSError, ValueError) as error:
        raise CurationReject(path, "unreadable", f"FFmpeg cannot open it ({error})") from None
    with container:
        if not container.streams.video:
            raise CurationReject(path, "no_video_stream", "the file holds no video stream (audio or data only?)")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        if container.format.name.endswith(_IMAGE_DEMUXER_SUFFIXES) or (codec in _IMAGE_CODECS and (stream.frames or 0) <= 1):
            raise CurationReject(path, "still_image", f"it is a still image ({codec}), not a video")
        # An MP4/MOV index lists where every frame's bytes live; bytes past the end = cut short.
        entries = stream.index_entries
        if len(entries) > 0:
            last = entries[len(entries) - 1]
            if last.pos + last.size > file_size:
                raise CurationReject(path, "truncated", "its frame index points past the end of the file; re-copy it")
        fps = _frame_rate(stream)
        if not fps > 0:
            raise CurationReject(path, "bad_frame_rate", "the video stream declares no frame rate")
        stream.thread_type = "AUTO"
        try:
            first = next(container.decode(stream), None)
        except (av.FFmpegError, ValueError) as error:
            raise CurationReject(path, "unreadable", f"decoding the first frame failed ({error})") from None
        if first is None:
            raise CurationReject(path, "no_frames", "the video stream has no decodable frame")
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            num_frames = _count_packets(path)
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        else:
            duration_s = num_frames / fps
        rotation = int(first.rotation) % 360
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
    if num_frames <= 0:
        raise CurationReject(path, "no_frames", "the video stream has no frames")
    return VideoProbe(
        path=str(path),
        duration_s=float(duration_s),
        fps=fps,
        num_frames=num_frames,
        width=int(width),
        height=int(height),
        codec=codec,
        rotation=rotation,
    )


def _count_packets(path: Path) -> int:
    """Count video packets by demuxing without decoding (containers that store no frame count)."""
    try:
        with av.open(str(path), mode="r") as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
    except (av.FFmpegError, ValueError) as error:
        raise CurationReject(path, "unreadable", f"demuxing failed ({error})") from None
