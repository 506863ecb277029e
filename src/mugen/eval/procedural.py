"""Read colour, shape and direction back out of a procedural clip (prompt adherence, no learned judge).

`mugen.data.synthetic` renders one coloured shape moving over a dark, plain background. A model
trained on those clips is scored by generating from a caption and checking that the clip shows
what the caption says, the offline analogue of the report's prompt-following evaluation (seed
§6.1). The detector is classical image analysis:

1. Foreground: the background colour is the per-channel median of all pixels; each pixel's
   distance to it, with Otsu's threshold, splits shape from background. A soft coverage in [0, 1]
   (distance relative to the shape's own contrast) keeps anti-aliased and blurred edges.
2. Colour: hue of the mean foreground colour, nearest palette hue (circular distance).
3. Shape: on a few frames of the middle half, each candidate shape is drawn with the observed
   area and centroid (and a few blur levels); the one whose coverage map differs least (L1)
   from the observed coverage wins. Area and centroid are what blur and noise change least.
4. Direction: least-squares line through the coverage-weighted centroids over time; its
   displacement from first to last frame, when long enough, picks the nearest of the four
   directions.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from torch import Tensor

from mugen.data.synthetic import COLOURS, DIRECTIONS, SHAPES, ProceduralSpec, shape_coverage
from mugen.errors import MugenError

_TEMPLATE_BLURS = (0.0, 0.8, 1.4, 2.0)  # Gaussian sigmas (pixels) tried when matching a shape template
_SHAPE_FRAMES = 4  # frames of the middle half used for the shape vote
_MIN_CONTRAST = 0.25  # foreground must differ from the background by this much ([-1, 1] units)
_MIN_SATURATION = 0.2  # below this the foreground is grey and has no hue to name
_MIN_TRAVEL = 0.08  # displacement, as a fraction of the short side, below which it "barely moves"
_MIN_PIXELS = 3.0  # coverage mass (pixels) for a frame to count as showing the shape


@dataclass
class ProceduralDetection:
    """What the detector saw; None where it could not tell. `confidence` holds margins in [0, 1]."""

    colour: str | None
    shape: str | None
    direction: str | None
    confidence: dict = field(default_factory=dict)


def _hue(rgb: np.ndarray) -> tuple[float, float]:
    """(hue in degrees, saturation) of an RGB colour with channels in [0, 1]."""
    hue, saturation, _ = colorsys.rgb_to_hsv(*np.clip(rgb, 0.0, 1.0))
    return 360.0 * hue, saturation


_PALETTE_HUES = {name: _hue(np.asarray(rgb) / 255.0)[0] for name, rgb in COLOURS.items()}


def _foreground_coverage(frames: np.ndarray) -> tuple[np.ndarray, float]:
    """(T, H, W, 3) frames in [-1, 1] -> soft coverage (T, H, W) in [0, 1] and the contrast.

    Coverage is zero outside the largest connected foreground blob of each frame (slightly
    grown, to keep soft edges), so stray noisy pixels do not move centroids or widths.
    """
    smoothed = np.stack([cv2.GaussianBlur(f, (3, 3), 0.8) for f in frames])  # (T, H, W, 3)
    background = np.median(smoothed.reshape(-1, 3), axis=0)  # (3,)
    distance = np.linalg.norm(smoothed - background, axis=-1)  # (T, H, W)
    noise_floor = float(np.median(distance))
    scale = max(float(distance.max()), 1e-6)
    otsu, _ = cv2.threshold(
        np.round(distance / scale * 255).astype(np.uint8).reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU
    )
    above = distance[distance > otsu / 255 * scale]
    if above.size == 0:
        return np.zeros_like(distance), 0.0
    full_level = float(np.percentile(above, 90))
    contrast = full_level - noise_floor
    if contrast < _MIN_CONTRAST:
        return np.zeros_like(distance), contrast
    coverage = np.clip((distance - noise_floor) / contrast, 0.0, 1.0)  # (T, H, W)
    halfway = (distance > noise_floor + 0.5 * contrast).astype(np.uint8)  # (T, H, W)
    grow = np.ones((5, 5), np.uint8)
    for t in range(len(frames)):
        count, labels, stats, _ = cv2.connectedComponentsWithStats(halfway[t], connectivity=8)
        if count < 2:
            coverage[t] = 0.0
            continue
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        keep = cv2.dilate((labels == largest).astype(np.uint8), grow)
        coverage[t] *= keep
    return coverage, contrast


def _classify_colour(frames: np.ndarray, coverage: np.ndarray) -> tuple[str | None, float]:
    core = coverage > 0.8  # (T, H, W) pixels fully inside the shape
    if core.sum() == 0:
        return None, 0.0
    mean_rgb = (frames[core].mean(axis=0) + 1.0) / 2.0  # (3,) in [0, 1]
    hue, saturation = _hue(mean_rgb)
    if saturation < _MIN_SATURATION:
        return None, 0.0
    gaps = {name: min(abs(hue - h), 360.0 - abs(hue - h)) for name, h in _PALETTE_HUES.items()}
    ranked = sorted(gaps, key=gaps.get)
    best, runner_up = ranked[0], ranked[1]
    # Margin: 1 when the hue sits on the palette hue, 0 halfway to the next-nearest one.
    margin = 1.0 - gaps[best] / max((gaps[best] + gaps[runner_up]) / 2, 1e-6)
    return best, float(np.clip(margin, 0.0, 1.0))


def _touches_border(coverage: np.ndarray) -> bool:
    edges = (coverage[0], coverage[-1], coverage[:, 0], coverage[:, -1])
    return max(float(edge.max()) for edge in edges) > 0.5


def _centroid(coverage: np.ndarray) -> tuple[float, float]:
    """Coverage-weighted centre (x, y) in pixel units of an (H, W) map."""
    height, width = coverage.shape
    mass = coverage.sum()
    centre_x = float((coverage.sum(axis=0) * (np.arange(width) + 0.5)).sum() / mass)
    centre_y = float((coverage.sum(axis=1) * (np.arange(height) + 0.5)).sum() / mass)
    return centre_x, centre_y


def _template_mismatch(shape: str, observed: np.ndarray) -> float:
    """L1 distance, per unit of area, between an (H, W) coverage map and `shape` fitted to it.

    The template gets the observed area and centroid; it is compared at several blur levels
    (the smallest distance counts), so a soft generated clip is not mistaken for a round shape.
    """
    height, width = observed.shape
    mass = float(observed.sum())
    centre_x, centre_y = _centroid(observed)
    half = math.sqrt(mass) / 2.0
    trial = shape_coverage(shape, height, width, centre_x, centre_y, half)
    half *= math.sqrt(mass / max(float(trial.sum()), 1e-6))  # match the area
    trial = shape_coverage(shape, height, width, centre_x, centre_y, half)
    trial_x, trial_y = _centroid(trial)  # a triangle's centroid sits below its box centre
    template = shape_coverage(shape, height, width, 2 * centre_x - trial_x, 2 * centre_y - trial_y, half)
    distances = []
    for sigma in _TEMPLATE_BLURS:
        blurred = cv2.GaussianBlur(template, (0, 0), sigma) if sigma > 0 else template
        distances.append(float(np.abs(blurred - observed).sum()) / mass)
    return min(distances)


def _classify_shape(coverage: np.ndarray) -> tuple[str | None, float]:
    num_frames = len(coverage)
    middle = list(range(num_frames // 4, max(num_frames // 4 + 1, (3 * num_frames + 3) // 4)))
    visible = [t for t in range(num_frames) if coverage[t].sum() >= _MIN_PIXELS]
    # Prefer the middle half, and frames where the frame edge does not cut the shape.
    candidates = (
        [t for t in middle if t in visible and not _touches_border(coverage[t])],
        [t for t in visible if not _touches_border(coverage[t])],
        [t for t in middle if t in visible],
        visible,
    )
    usable = next((frames for frames in candidates if frames), [])
    if not usable:
        return None, 0.0
    usable = usable[:: max(1, len(usable) // _SHAPE_FRAMES)][:_SHAPE_FRAMES]
    mismatch = {shape: float(np.mean([_template_mismatch(shape, coverage[t]) for t in usable])) for shape in SHAPES}
    ranked = sorted(mismatch, key=mismatch.get)
    best, runner_up = ranked[0], ranked[1]
    margin = 1.0 - mismatch[best] / max(mismatch[runner_up], 1e-6)
    return best, float(np.clip(margin, 0.0, 1.0))


def _classify_direction(coverage: np.ndarray) -> tuple[str | None, float]:
    num_frames, height, width = coverage.shape
    mass = coverage.sum(axis=(1, 2))  # (T,)
    visible = np.flatnonzero(mass >= _MIN_PIXELS)
    if len(visible) < 2:
        return None, 0.0
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    centroid_x = (coverage[visible].sum(axis=1) * xs).sum(axis=1) / mass[visible]  # (V,)
    centroid_y = (coverage[visible].sum(axis=2) * ys).sum(axis=1) / mass[visible]  # (V,)
    slope_x = np.polyfit(visible, centroid_x, 1)[0]
    slope_y = np.polyfit(visible, centroid_y, 1)[0]
    displacement = np.array([slope_x, slope_y]) * (num_frames - 1)  # first -> last frame
    travel = float(np.linalg.norm(displacement))
    if travel < _MIN_TRAVEL * min(height, width):
        return None, 0.0
    cosines = {name: float(np.dot(displacement, vector) / travel) for name, vector in DIRECTIONS.items()}
    best = max(cosines, key=cosines.get)
    # Margin: 1 for motion exactly along the direction, 0 on the diagonal between two directions.
    margin = (cosines[best] - math.cos(math.pi / 4)) / (1.0 - math.cos(math.pi / 4))
    return best, float(np.clip(margin, 0.0, 1.0))


def detect_procedural(video: Tensor) -> ProceduralDetection:
    """Say which colour, shape and direction a (3, T, H, W) clip in [-1, 1] shows."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise MugenError(f"detect_procedural needs a (3, T, H, W) video, got shape {tuple(video.shape)}")
    frames = video.detach().float().cpu().permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
    frames = np.ascontiguousarray(np.clip(frames, -1.0, 1.0))
    coverage, contrast = _foreground_coverage(frames)  # (T, H, W)
    if not coverage.any():
        return ProceduralDetection(None, None, None, {"foreground_contrast": float(contrast)})
    colour, colour_margin = _classify_colour(frames, coverage)
    shape, shape_margin = _classify_shape(coverage)
    direction, direction_margin = _classify_direction(coverage)
    confidence = {
        "foreground_contrast": float(contrast),
        "colour": colour_margin,
        "shape": shape_margin,
        "direction": direction_margin,
    }
    return ProceduralDetection(colour, shape, direction, confidence)


def score_adherence(videos: list[Tensor], specs: list[ProceduralSpec]) -> dict:
    """Fraction of clips whose detected colour, shape, direction (and all three) match the spec.

    Returns {"colour", "shape", "direction", "all": fractions, "num_samples": n, "rows": one dict
    per clip with the expected and detected values}.
    """
    if len(videos) != len(specs):
        raise MugenError(f"score_adherence got {len(videos)} videos but {len(specs)} specs; pass one spec per video")
    if not videos:
        raise MugenError("score_adherence got no videos; pass at least one")
    rows = []
    for index, (video, spec) in enumerate(zip(videos, specs)):
        found = detect_procedural(video)
        correct = {
            "colour": found.colour == spec.colour,
            "shape": found.shape == spec.shape,
            "direction": found.direction == spec.direction,
        }
        correct["all"] = all(correct.values())
        rows.append({
            "index": index,
            "caption": spec.caption(),
            "expected": {"colour": spec.colour, "shape": spec.shape, "direction": spec.direction},
            "detected": {"colour": found.colour, "shape": found.shape, "direction": found.direction},
            "correct": correct,
            "confidence": found.confidence,
        })
    scores = {key: sum(row["correct"][key] for row in rows) / len(rows) for key in ("colour", "shape", "direction", "all")}
    return {**scores, "num_samples": len(rows), "rows": rows}
