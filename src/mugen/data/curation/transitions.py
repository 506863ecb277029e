"""Gradual-transition (fade, dissolve) detection with colour + structure features and an SVM.

Seed §2.1 pairs PySceneDetect (hard cuts) with a Color-Struct SVM ("CSS") that finds what a
frame-difference detector misses: fades to/from black and cross-dissolves, where no two adjacent
frames differ much. This is our version of that idea:

1. per frame (from the small analysis frame the scene splitter already decodes): an HSV colour
   histogram, a 32x18 grey thumbnail, a 4x3 grid of mean colours, the mean Sobel gradient
   magnitude (edge energy) and the luminance mean/std;
2. per window centred on frame t, at several half-widths k: how different the two ends are
   (colour histogram distance), whether that change happens in one step (a cut) or spread over
   the window (gradual), whether frame t is a linear mix of the two ends (the signature of a
   dissolve/fade: `t ~ (t-k + t+k) / 2`), and the dip in edge energy and contrast in the middle;
3. an RBF SVM (scikit-learn) over the standardised window features decides per frame;
   consecutive positive frames form a transition interval.

The SVM is trained by `scripts/train_transition_svm.py` on fades and dissolves synthesised from
real footage; its support vectors, coefficients and feature scaling ship in
`transition_svm.json` and are evaluated here with numpy (no pickle, no scikit-learn at run time).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mugen.errors import MugenError

DEFAULT_WEIGHTS_PATH = Path(__file__).with_name("transition_svm.json")

# Half-widths (frames) of the windows compared around each frame: a transition of length L is
# seen best at k ~ L/2; these cover transitions of roughly 4 to 48 frames.
WINDOW_HALF_WIDTHS: tuple[int, ...] = (2, 4, 8, 16, 24)
_THUMBNAIL_SIZE = (32, 18)  # (width, height) of the grey thumbnail used for the linear-mix test
_COLOUR_GRID_SIZE = (4, 3)  # (width, height) of the coarse colour layout: robust to motion
_HUE_BINS, _SAT_BINS, _VAL_BINS = 16, 8, 8
_FEATURES_PER_SCALE = 9
NUM_WINDOW_FEATURES = 2 + _FEATURES_PER_SCALE * len(WINDOW_HALF_WIDTHS)


# Per-frame feature row layout (float32): histogram | thumbnail | colour grid | edge, mean, std.
_HIST = slice(0, _HUE_BINS + _SAT_BINS + _VAL_BINS)  # 32 values, each channel's histogram sums to 1
_THUMB = slice(_HIST.stop, _HIST.stop + _THUMBNAIL_SIZE[0] * _THUMBNAIL_SIZE[1])  # 576 grey values 0-255
_GRID = slice(_THUMB.stop, _THUMB.stop + _COLOUR_GRID_SIZE[0] * _COLOUR_GRID_SIZE[1] * 3)  # 36 mean BGR values
_EDGE, _LUMA_MEAN, _LUMA_STD = _GRID.stop, _GRID.stop + 1, _GRID.stop + 2
FRAME_FEATURE_SIZE = _GRID.stop + 3


def frame_features(bgr: np.ndarray) -> np.ndarray:
    """Colour + structure summary of one (H, W, 3) uint8 BGR analysis frame -> (FRAME_FEATURE_SIZE,):
    HSV histogram (16 hue + 8 saturation + 8 value bins), 32x18 grey thumbnail, 4x3 grid of mean
    colours, mean Sobel gradient magnitude (edge energy), luminance mean and std."""
    row = np.empty(FRAME_FEATURE_SIZE, np.float32)
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    pixels = float(hsv.shape[0] * hsv.shape[1])
    row[_HIST] = np.concatenate(
        [
            cv2.calcHist([hsv], [0], None, [_HUE_BINS], [0, 180]).ravel(),
            cv2.calcHist([hsv], [1], None, [_SAT_BINS], [0, 256]).ravel(),
            cv2.calcHist([hsv], [2], None, [_VAL_BINS], [0, 256]).ravel(),
        ]
    ) / pixels
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    gradient_x = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gradient_y = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    row[_EDGE] = cv2.magnitude(gradient_x, gradient_y).mean()
    row[_THUMB] = cv2.resize(grey, _THUMBNAIL_SIZE, interpolation=cv2.INTER_AREA).ravel()  # 18 x 32
    row[_GRID] = cv2.resize(bgr, _COLOUR_GRID_SIZE, interpolation=cv2.INTER_AREA).ravel()  # 3 x 4 x 3
    mean, std = cv2.meanStdDev(grey)
    row[_LUMA_MEAN], row[_LUMA_STD] = mean[0, 0], std[0, 0]
    return row


def window_features(rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Window features for frames `centres` of the per-frame feature matrix `rows` (frames, FRAME_FEATURE_SIZE);
    rows must reach max(WINDOW_HALF_WIDTHS) beyond every centre on both sides (callers repeat the
    first/last frame at the ends of a video). -> (len(centres), NUM_WINDOW_FEATURES)"""
    rows = np.asarray(rows, dtype=np.float32)
    centres = np.asarray(centres)
    histograms, thumbnails, grids = rows[:, _HIST], rows[:, _THUMB], rows[:, _GRID]
    # Histogram distance (half L1 per channel, averaged over 3 channels, in [0, 1]) between
    # consecutive frames: steps[j] is the change from frame j to j + 1.
    steps = np.abs(np.diff(histograms, axis=0)).sum(1) / 6.0  # (frames - 1,)
    middle = rows[centres]  # (B, F)
    columns = [middle[:, _LUMA_MEAN] / 255.0, middle[:, _LUMA_STD] / 128.0]
    for k in WINDOW_HALF_WIDTHS:
        before, after = centres - k, centres + k
        ends_distance = np.abs(histograms[before] - histograms[after]).sum(1) / 6.0
        local_steps = np.lib.stride_tricks.sliding_window_view(steps, 2 * k)[before]  # (B, 2k) steps inside the window
        largest_step = local_steps.max(1)
        # A cut puts all of the change in one step; a gradual transition spreads it out.
        step_share = largest_step / (local_steps.sum(1) + 1e-3)
        # Dissolves and fades are linear mixes of their ends: the middle frame ~ the ends' average.
        span = np.abs(thumbnails[before] - thumbnails[after]).mean(1)
        residual = np.abs(thumbnails[centres] - 0.5 * (thumbnails[before] + thumbnails[after])).mean(1)
        # The same test on the coarse colour layout, which fast motion disturbs much less.
        grid_span = np.abs(grids[before] - grids[after]).mean(1)
        grid_residual = np.abs(grids[centres] - 0.5 * (grids[before] + grids[after])).mean(1)
        # Mixing two unrelated images lowers edge energy and contrast in the middle.
        edge_dip = middle[:, _EDGE] / (np.maximum(rows[before, _EDGE], rows[after, _EDGE]) + 1.0)
        contrast_dip = middle[:, _LUMA_STD] / (np.maximum(rows[before, _LUMA_STD], rows[after, _LUMA_STD]) + 1.0)
        columns += [
            ends_distance, largest_step, step_share, span / 64.0, residual / (span + 2.0),
            grid_span / 64.0, grid_residual / (grid_span + 2.0), edge_dip, contrast_dip,
        ]
    return np.stack(columns, axis=1).astype(np.float32)


@dataclass
class TransitionSVM:
    """An RBF-kernel SVM evaluated with numpy: `decision(x) = sum_i a_i exp(-gamma |x' - s_i|^2) + b`
    where `x' = (x - mean) / scale`. Positive = inside a gradual transition."""

    support_vectors: np.ndarray  # (S, F) in standardised feature space
    dual_coefficients: np.ndarray  # (S,)
    intercept: float
    gamma: float
    feature_mean: np.ndarray  # (F,)
    feature_scale: np.ndarray  # (F,)
    metadata: dict

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """(N, F) window features -> (N,) decision values."""
        standardised = (np.asarray(features, dtype=np.float64) - self.feature_mean) / self.feature_scale
        squared = (
            (standardised**2).sum(1, keepdims=True)
            - 2.0 * standardised @ self.support_vectors.T
            + (self.support_vectors**2).sum(1)[None, :]
        )  # (N, S) squared distances
        return np.exp(-self.gamma * np.maximum(squared, 0.0)) @ self.dual_coefficients + self.intercept

    def to_dict(self) -> dict:
        return {
            "format": "mugen.transition_svm.v1",
            "window_half_widths": list(WINDOW_HALF_WIDTHS),
            "num_features": int(self.support_vectors.shape[1]),
            "support_vectors": np.round(self.support_vectors, 6).tolist(),
            "dual_coefficients": np.round(self.dual_coefficients, 6).tolist(),
            "intercept": float(self.intercept),
            "gamma": float(self.gamma),
            "feature_mean": self.feature_mean.tolist(),
            "feature_scale": self.feature_scale.tolist(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "TransitionSVM":
        if data.get("format") != "mugen.transition_svm.v1":
            raise MugenError(f"transition SVM weights '{source}' have an unknown format; regenerate them with scripts/train_transition_svm.py")
        if tuple(data["window_half_widths"]) != WINDOW_HALF_WIDTHS or data["num_features"] != NUM_WINDOW_FEATURES:
            raise MugenError(
                f"transition SVM weights '{source}' were trained for other window features "
                f"({data['window_half_widths']}, {data['num_features']} features); retrain with scripts/train_transition_svm.py"
            )
        return cls(
            support_vectors=np.asarray(data["support_vectors"], dtype=np.float64),
            dual_coefficients=np.asarray(data["dual_coefficients"], dtype=np.float64),
            intercept=float(data["intercept"]),
            gamma=float(data["gamma"]),
            feature_mean=np.asarray(data["feature_mean"], dtype=np.float64),
            feature_scale=np.asarray(data["feature_scale"], dtype=np.float64),
            metadata=dict(data.get("metadata", {})),
        )


_LOADED: dict[str, TransitionSVM] = {}


def load_transition_svm(path: str | os.PathLike | None = None) -> TransitionSVM:
    """Load SVM weights (JSON); `None` = the weights shipped with mugen. Cached per path."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS_PATH
    key = str(path.resolve())
    if key not in _LOADED:
        if not path.is_file():
            raise MugenError(f"transition SVM weights '{path}' not found; pass an existing file or retrain with scripts/train_transition_svm.py")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise MugenError(f"transition SVM weights '{path}' are not valid JSON ({error})") from None
        _LOADED[key] = TransitionSVM.from_dict(data, source=str(path))
    return _LOADED[key]


def frames_to_intervals(positive: np.ndarray, merge_gap: int, min_length: int) -> list[tuple[int, int]]:
    """Boolean per-frame decisions -> [start, end) runs, joining runs split by <= merge_gap negatives
    and dropping runs shorter than min_length frames."""
    runs: list[list[int]] = []
    for index in np.flatnonzero(positive):
        if runs and index - runs[-1][1] <= merge_gap:
            runs[-1][1] = int(index) + 1
        else:
            runs.append([int(index), int(index) + 1])
    return [(start, end) for start, end in runs if end - start >= min_length]


class WindowFeatureStream:
    """Streaming window features: `push` analysis frames in order; `pop_ready()` returns the rows of
    the frames whose windows are complete, `finish()` the rest (the first/last frame is repeated
    beyond the ends of the video). Features are computed in vectorised chunks.

    Memory is bounded: per-frame features of the last `2 * max(k) + chunk` frames only.
    """

    def __init__(self, chunk: int = 64) -> None:
        self._reach = max(WINDOW_HALF_WIDTHS)
        self._chunk = chunk
        self._rows: list[np.ndarray] = []  # per-frame features; _rows[i] is padded frame _offset + i
        self._offset = 0  # padded index of _rows[0]; padded index = frame index + reach
        self._next_centre = self._reach  # padded index of the next frame without window features
        self._pushed = 0

    def push(self, bgr: np.ndarray) -> None:
        self.push_features(frame_features(bgr))

    def push_features(self, row: np.ndarray) -> None:
        if self._pushed == 0:
            self._rows.extend([row] * self._reach)  # repeat the first frame before the start
        self._rows.append(row)
        self._pushed += 1

    def _compute(self, last_centre: int) -> np.ndarray:
        """Window features for padded centres [_next_centre, last_centre]; drops rows no longer needed."""
        if last_centre < self._next_centre:
            return np.zeros((0, NUM_WINDOW_FEATURES), np.float32)
        block = np.stack(self._rows)  # (rows, F)
        centres = np.arange(self._next_centre, last_centre + 1) - self._offset
        features = window_features(block, centres)
        self._next_centre = last_centre + 1
        keep_from = self._next_centre - self._reach - self._offset
        self._rows = self._rows[keep_from:]
        self._offset += keep_from
        return features

    def pop_ready(self) -> np.ndarray:
        """(n, NUM_WINDOW_FEATURES) for the next frames whose windows are complete (in chunks)."""
        last_ready = self._offset + len(self._rows) - 1 - self._reach  # padded centre with a full window
        if last_ready - self._next_centre + 1 < self._chunk:
            return np.zeros((0, NUM_WINDOW_FEATURES), np.float32)
        return self._compute(last_ready)

    def finish(self) -> np.ndarray:
        """Rows for every frame not returned yet (pads the end by repeating the last frame)."""
        if self._pushed == 0:
            return np.zeros((0, NUM_WINDOW_FEATURES), np.float32)
        self._rows.extend([self._rows[-1]] * self._reach)
        return self._compute(self._pushed - 1 + self._reach)

    @property
    def frames_ready(self) -> int:
        """How many frames (from the start) have had their window features returned."""
        return self._next_centre - self._reach


def window_feature_matrix(frames) -> np.ndarray:
    """All window features of a sequence of BGR analysis frames -> (frames, NUM_WINDOW_FEATURES)."""
    stream = WindowFeatureStream()
    parts = []
    for frame in frames:
        stream.push(frame)
        parts.append(stream.pop_ready())
    parts.append(stream.finish())
    return np.concatenate(parts)


class GradualTransitionDetector:
    """Streaming detector: `push` each analysis frame (H, W, 3) uint8 BGR in order. `decisions`
    grows as windows complete (SVM decision per frame; positive = inside a fade/dissolve);
    `intervals(lo)` gives the runs found so far from frame `lo`; `finish()` -> all intervals."""

    def __init__(self, svm: TransitionSVM | None = None, threshold: float = 0.0, merge_gap: int = 2, min_length: int = 3):
        self.svm = svm if svm is not None else load_transition_svm()
        self.threshold = threshold
        self.merge_gap = merge_gap
        self.min_length = min_length
        self._features = WindowFeatureStream()
        self._decisions: list[np.ndarray] = []
        self.decided = 0  # frames with a decision so far

    def _decide(self, rows: np.ndarray) -> None:
        if len(rows):
            self._decisions.append(self.svm.decision_function(rows))
            self.decided += len(rows)

    def push(self, bgr: np.ndarray) -> None:
        self._features.push(bgr)
        self._decide(self._features.pop_ready())

    @property
    def decisions(self) -> np.ndarray:
        """(decided,) SVM decision values so far (8 bytes per frame)."""
        if len(self._decisions) > 1:
            self._decisions = [np.concatenate(self._decisions)]
        return self._decisions[0] if self._decisions else np.zeros(0)

    def intervals(self, lo: int = 0) -> list[tuple[int, int]]:
        """Transitions among the decided frames >= lo as [start, end) (a run cut by `lo` keeps its
        part after lo; callers pass lo far enough back that such a run is long)."""
        runs = frames_to_intervals(self.decisions[lo:] > self.threshold, self.merge_gap, self.min_length)
        return [(start + lo, end + lo) for start, end in runs]

    def finish(self) -> list[tuple[int, int]]:
        self._decide(self._features.finish())
        return self.intervals()


# ----------------------------------------------------------------------------------------------
# Synthesis of transitions from real footage (training data for the SVM, and test material)

TRANSITION_KINDS = ("dissolve", "fade")


def synthesize_transition(kind: str, outgoing: np.ndarray, incoming: np.ndarray) -> np.ndarray:
    """Blend two shots the way an editor's transition does. `outgoing` and `incoming` are the
    (L, H, W, 3) uint8 frames that play during the transition (both shots keep moving);
    returns the L transition frames:

    - "dissolve": a cross-fade, weight of `incoming` rising linearly from 1/(L+1) to L/(L+1);
    - "fade": `outgoing` fades to black over the first half, `incoming` fades in from black over
      the second half (a dip to black).
    """
    if outgoing.shape != incoming.shape or outgoing.ndim != 4:
        raise ValueError(f"expected two (L, H, W, 3) arrays of one shape, got {outgoing.shape} and {incoming.shape}")
    length = outgoing.shape[0]
    first = outgoing.astype(np.float32)
    second = incoming.astype(np.float32)
    if kind == "dissolve":
        weight = (np.arange(1, length + 1, dtype=np.float32) / (length + 1))[:, None, None, None]  # (L, 1, 1, 1)
        blended = (1.0 - weight) * first + weight * second
    elif kind == "fade":
        half = length // 2
        out_gain = 1.0 - np.arange(1, half + 1, dtype=np.float32) / (half + 1)  # (half,)
        in_gain = np.arange(1, length - half + 1, dtype=np.float32) / (length - half + 1)  # (L - half,)
        blended = np.concatenate(
            [first[:half] * out_gain[:, None, None, None], second[half:] * in_gain[:, None, None, None]]
        )
    else:
        raise ValueError(f"kind={kind!r} must be one of {TRANSITION_KINDS}")
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
