"""Gradual-transition (fade, dissolve) detection with colour + structure features and an SVM.

Seed §2.1 pairs PySceneDetect (hard cuts) with a Color-Struct SVM ("CSS") that finds what a
frame-difference detector misses: fades to/from black and cross-dissolves, where no two adjacent
frames differ much. This is our version of that idea:

1. per frame (from the small analysis frame the scene splitter already decodes): an HSV colour
   histogram, a 32x18 grey thumbnail, the mean Sobel gradient magnitude (edge energy) and the
   luminance mean/std;
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
from collections import deque
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
_HUE_BINS, _SAT_BINS, _VAL_BINS = 16, 8, 8
_FEATURES_PER_SCALE = 7
NUM_WINDOW_FEATURES = 2 + _FEATURES_PER_SCALE * len(WINDOW_HALF_WIDTHS)


@dataclass
class FrameFeatures:
    """Colour + structure summary of one analysis frame."""

    histogram: np.ndarray  # (16 + 8 + 8,) float32, each channel's histogram sums to 1
    thumbnail: np.ndarray  # (18, 32) float32 grey in [0, 255]
    edge_energy: float  # mean Sobel gradient magnitude of the grey frame
    luma_mean: float
    luma_std: float


def frame_features(bgr: np.ndarray) -> FrameFeatures:
    """Features of one (H, W, 3) uint8 BGR analysis frame."""
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    pixels = float(hsv.shape[0] * hsv.shape[1])
    histogram = np.concatenate(
        [
            cv2.calcHist([hsv], [0], None, [_HUE_BINS], [0, 180]).ravel(),
            cv2.calcHist([hsv], [1], None, [_SAT_BINS], [0, 256]).ravel(),
            cv2.calcHist([hsv], [2], None, [_VAL_BINS], [0, 256]).ravel(),
        ]
    ).astype(np.float32) / pixels  # (32,)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    gradient_x = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gradient_y = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    edge_energy = float(cv2.magnitude(gradient_x, gradient_y).mean())
    thumbnail = cv2.resize(grey, _THUMBNAIL_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)  # (18, 32)
    mean, std = cv2.meanStdDev(grey)
    return FrameFeatures(histogram, thumbnail, edge_energy, float(mean[0, 0]), float(std[0, 0]))


def _histogram_distance(a: FrameFeatures, b: FrameFeatures) -> float:
    """Half the L1 distance per channel histogram, averaged over the 3 channels: in [0, 1]."""
    return float(np.abs(a.histogram - b.histogram).sum() / 6.0)


def window_features(window: list[FrameFeatures], centre: int) -> np.ndarray:
    """Features for the frame `window[centre]`; `window` must reach `max(WINDOW_HALF_WIDTHS)` on both
    sides of it (callers repeat the first/last frame at the ends of a video). -> (NUM_WINDOW_FEATURES,)"""
    middle = window[centre]
    # One-step histogram changes inside the widest window, reused by every scale.
    widest = max(WINDOW_HALF_WIDTHS)
    steps = np.array(
        [_histogram_distance(window[j], window[j + 1]) for j in range(centre - widest, centre + widest)]
    )  # (2 * widest,); steps[i] is the change from frame centre - widest + i to the next
    values = [middle.luma_mean / 255.0, middle.luma_std / 128.0]
    for k in WINDOW_HALF_WIDTHS:
        before, after = window[centre - k], window[centre + k]
        ends_distance = _histogram_distance(before, after)
        local_steps = steps[widest - k : widest + k]  # (2k,) steps between frames centre-k .. centre+k
        largest_step = float(local_steps.max())
        # A cut puts all of the change in one step; a gradual transition spreads it out.
        step_share = largest_step / (float(local_steps.sum()) + 1e-3)
        # Dissolves and fades are linear mixes of their ends: the middle frame ~ the ends' average.
        span = float(np.abs(before.thumbnail - after.thumbnail).mean())
        residual = float(np.abs(middle.thumbnail - 0.5 * (before.thumbnail + after.thumbnail)).mean())
        mix_residual = residual / (span + 2.0)
        # Mixing two unrelated images lowers edge energy and contrast in the middle.
        edge_dip = middle.edge_energy / (max(before.edge_energy, after.edge_energy) + 1.0)
        contrast_dip = middle.luma_std / (max(before.luma_std, after.luma_std) + 1.0)
        values += [ends_distance, largest_step, step_share, span / 64.0, mix_residual, edge_dip, contrast_dip]
    return np.asarray(values, dtype=np.float32)


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
    """Streaming window features: `push` each analysis frame in order, then `finish()` ->
    (frames, NUM_WINDOW_FEATURES). The first/last frame is repeated beyond the ends of the video.

    Memory is bounded: it keeps the per-frame features of the last `2 * max(k) + 1` frames and one
    window feature vector per frame (NUM_WINDOW_FEATURES = 37 floats).
    """

    def __init__(self) -> None:
        self._reach = max(WINDOW_HALF_WIDTHS)
        self._buffer: deque[FrameFeatures] = deque(maxlen=2 * self._reach + 1)
        self._rows: list[np.ndarray] = []
        self._pushed = 0

    def push_features(self, features: FrameFeatures) -> None:
        if self._pushed == 0:
            for _ in range(self._reach):  # repeat the first frame before the start
                self._buffer.append(features)
        self._buffer.append(features)
        self._pushed += 1
        if len(self._buffer) == self._buffer.maxlen:
            self._rows.append(window_features(list(self._buffer), self._reach))

    def push(self, bgr: np.ndarray) -> None:
        self.push_features(frame_features(bgr))

    def finish(self) -> np.ndarray:
        if self._pushed:
            last = self._buffer[-1]
            while len(self._rows) < self._pushed:  # repeat the last frame after the end
                self._buffer.append(last)
                self._rows.append(window_features(list(self._buffer), self._reach))
        return np.stack(self._rows) if self._rows else np.zeros((0, NUM_WINDOW_FEATURES), np.float32)


class GradualTransitionDetector:
    """Streaming detector: `push` each analysis frame (H, W, 3) uint8 BGR in order, then
    `finish()` -> [start, end) intervals of detected fades/dissolves."""

    def __init__(self, svm: TransitionSVM | None = None, threshold: float = 0.0, merge_gap: int = 2, min_length: int = 3):
        self.svm = svm if svm is not None else load_transition_svm()
        self.threshold = threshold
        self.merge_gap = merge_gap
        self.min_length = min_length
        self._features = WindowFeatureStream()
        self.decisions: np.ndarray | None = None  # (frames,) SVM decisions, set by finish()

    def push(self, bgr: np.ndarray) -> None:
        self._features.push(bgr)

    def finish(self) -> list[tuple[int, int]]:
        matrix = self._features.finish()  # (frames, NUM_WINDOW_FEATURES)
        self.decisions = self.svm.decision_function(matrix) if len(matrix) else np.zeros(0)
        return frames_to_intervals(self.decisions > self.threshold, self.merge_gap, self.min_length)


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
