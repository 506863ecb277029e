"""Small synthetic videos for the orchestration tests: a smooth random texture that scrolls
(so clips have real sharpness and motion), H.264 via PyAV, written in well under a second."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np


def texture(seed: int, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: blurred noise with edges, different for each seed."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    big = cv2.resize(noise, (width, height), interpolation=cv2.INTER_NEAREST)
    return cv2.GaussianBlur(big, (3, 3), 0)


def write_scrolling_video(path: Path, seed: int = 0, num_frames: int = 40, size: tuple[int, int] = (160, 96), fps: int = 25, speed: int = 3) -> Path:
    """Write `num_frames` frames of a texture scrolling `speed` px/frame to the right."""
    width, height = size
    canvas = texture(seed, height, width + speed * num_frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for index in range(num_frames):
            offset = speed * (num_frames - 1 - index)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(canvas[:, offset : offset + width]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
