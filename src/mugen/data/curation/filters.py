"""Stage 3 of curation: quality scores per clip and the keep/drop decision (seed §2.1).

Every clip is scored from a handful of decoded frames, never the whole clip (`score_clip` reads
them with keyframe-aware seeks; `split_and_score` keeps them while splitting, in one pass):

- frames: three evenly spaced pairs of consecutive frames, at the start, middle and end of the
  clip (`sample_pairs`); plus a short run of consecutive frames in the middle for camera shake.
  `split_and_score` takes the pairs on a grid (pairs starting at multiples of 8, at most 7
  frames from `score_clip`'s exact positions) so that it can keep them while decoding once;
- processing resolution: frames are scaled inside FFmpeg so the short side is 480 px
  (`FilterConfig.processing_short_side`; 854x480 for 16:9), whatever the source resolution
  (smaller videos are scaled up, so a low-resolution source scores as blurry as it looks at 480p).

Scores (all written to the manifest, thresholds from the seed are the defaults):

- `sharpness`: variance of the OpenCV Laplacian (3x3 aperture, float64) of the grey 480p frame,
  on the first frame of each of the three pairs. `sharpness` is the median of the three,
  `sharpness_min`/`sharpness_max` the extremes; the seed keeps a clip only if its frames lie in
  [200, 2000], so the clip is dropped when any sampled frame is outside.
- `motion`: mean optical-flow magnitude in **pixels per frame at the 480p processing size**,
  averaged over the three pairs; keep [1, 20]. OpenCV DIS flow by default; RAFT (torchvision)
  when `raft_weights` points at a local checkpoint.
- `aesthetic`: LAION-style predictor, a stack of Linear layers over the L2-normalised CLIP image
  embedding of the three sampled frames (mean score); keep >= 4.5. Needs a local CLIP directory
  (transformers `CLIPModel`) and the MLP weights; without them the score is None and
  `aesthetic_unavailable` says why (nothing is faked).
- post-processing, weight-free: `border_fraction` (share of the frame taken by letterbox /
  pillarbox bars, from rows/columns that stay dark and flat in every sampled frame) and `shake`
  (camera shake: RMS of the second difference of the global translation, estimated by phase
  correlation over 9 consecutive middle frames at 144p, reported in pixels per frame^2 at 480p).
- post-processing, model-based: any `ClipClassifier` (text overlays, special effects, speed
  changes, e.g. a local VLM) registered with `register_classifier`; its scores are stored as
  `classifier.<label>` and compared with `FilterConfig.classifier_max_scores`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from mugen.data.curation.decode import convert_frame, iter_video_frames, read_frames, size_for_short_side
from mugen.data.curation.probe import VideoProbe
from mugen.data.curation.scenes import SceneClip, SceneSplitConfig, StreamingSplitter
from mugen.errors import MugenError

MOTION_BACKENDS = ("dis", "raft")


# ----------------------------------------------------------------------------------------------
# Pluggable classifiers for what needs a model (seed §2.1 "Multimodal LLM filter")


@runtime_checkable
class ClipClassifier(Protocol):
    """Scores a clip for post-processing problems that need a model (text overlays, special
    effects, speed changes, ...). `frames` are the sampled RGB frames (H, W, 3) uint8 in time
    order. Returns {label: score in [0, 1]} (1 = the problem is surely present)."""

    name: str

    def __call__(self, frames: list[np.ndarray], clip: SceneClip, probe: VideoProbe) -> dict[str, float]: ...


_CLASSIFIER_FACTORIES: dict[str, Callable[..., ClipClassifier]] = {}


def register_classifier(name: str, factory: Callable[..., ClipClassifier]) -> None:
    """Make `factory(**options)` available as classifier `name` (e.g. a local VLM wrapper)."""
    _CLASSIFIER_FACTORIES[name] = factory


def make_classifier(name: str, **options) -> ClipClassifier:
    if name not in _CLASSIFIER_FACTORIES:
        raise MugenError(
            f"clip classifier {name!r} is not registered; registered: {sorted(_CLASSIFIER_FACTORIES) or 'none'}. "
            "Register one with mugen.data.curation.filters.register_classifier"
        )
    classifier = _CLASSIFIER_FACTORIES[name](**options)
    if not isinstance(classifier, ClipClassifier):
        raise MugenError(f"clip classifier {name!r} does not implement ClipClassifier (name + __call__)")
    return classifier


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class FilterConfig:
    """Which scores to compute and the ranges a clip must meet (seed §2.1 defaults)."""

    sharpness_range: tuple[float, float] = (200.0, 2000.0)
    motion_range: tuple[float, float] = (1.0, 20.0)  # pixels per frame at processing_short_side
    aesthetic_min: float = 4.5
    aesthetic_clip_dir: str | None = None  # local transformers CLIPModel directory
    aesthetic_mlp_weights: str | None = None  # LAION-style MLP state dict (.safetensors or .pth)
    motion_backend: str = "dis"  # "dis" (OpenCV) or "raft" (torchvision, needs raft_weights)
    raft_weights: str | None = None  # local torchvision RAFT state dict (.pth)
    processing_short_side: int = 480
    border_max_fraction: float = 0.2  # drop clips whose letterbox/pillarbox bars cover more
    shake_max: float = 2.0  # drop clips whose global-motion jitter (px/frame^2 at 480p) is larger
    shake_frames: int = 9  # consecutive middle frames used for the shake estimate
    shake_short_side: int = 144  # shake is estimated on frames this small (and reported at 480p)
    classifiers: tuple[ClipClassifier, ...] = ()
    classifier_max_scores: dict[str, float] = field(default_factory=dict)  # label -> max allowed

    def __post_init__(self) -> None:
        for name in ("sharpness_range", "motion_range"):
            low, high = getattr(self, name)
            if not low <= high:
                raise MugenError(f"{name}={getattr(self, name)} must be (low, high) with low <= high")
        if self.motion_backend not in MOTION_BACKENDS:
            raise MugenError(f"motion_backend={self.motion_backend!r} is unknown; use one of {MOTION_BACKENDS}")
        if self.motion_backend == "raft" and not self.raft_weights:
            raise MugenError("motion_backend='raft' needs raft_weights: a local torchvision RAFT .pth file")
        if (self.aesthetic_clip_dir is None) != (self.aesthetic_mlp_weights is None):
            raise MugenError(
                "the aesthetic predictor needs both aesthetic_clip_dir (a local CLIPModel folder) and "
                "aesthetic_mlp_weights (the MLP weights file); give both or neither"
            )
        if self.shake_frames < 3:
            raise MugenError(f"shake_frames={self.shake_frames} must be at least 3")
        if not 16 <= self.shake_short_side <= self.processing_short_side:
            raise MugenError(
                f"shake_short_side={self.shake_short_side} must be between 16 and processing_short_side={self.processing_short_side}"
            )


# ----------------------------------------------------------------------------------------------
# Frame sampling


def sample_pairs(clip: SceneClip, stride: int = 1) -> list[tuple[int, int]]:
    """Three evenly spaced pairs of consecutive frames: start, middle and end of the clip (seed §2.1).

    With `stride` > 1 the pairs start on multiples of `stride` (the grid the single-pass scorer
    keeps frames on): the first and last grid points inside the clip and the one nearest the middle.
    Returns [] when no grid point fits (a clip shorter than the stride)."""
    first = -(-clip.start_frame // stride) * stride  # ceil to the grid
    last = ((clip.end_frame - 2) // stride) * stride  # a pair (i, i + 1) needs i + 1 < end_frame
    if last < first:
        if stride == 1:
            raise MugenError(f"clip {clip} has {clip.num_frames} frame(s); scoring needs at least 2")
        return []
    middle = first + int(round((last - first) / (2 * stride))) * stride
    return [(i, i + 1) for i in sorted({first, middle, last})]


def shake_frame_indices(clip: SceneClip, count: int, stride: int = 1) -> list[int]:
    """`count` consecutive frames near the middle of the clip, starting on a multiple of `stride`
    ([] when no such run fits inside the clip)."""
    count = min(count, clip.num_frames)
    centre = clip.start_frame + (clip.num_frames - count) // 2
    first = -(-clip.start_frame // stride) * stride
    last = ((clip.end_frame - count) // stride) * stride
    if last < first:
        return []
    begin = min(max(int(round(centre / stride)) * stride, first), last)
    return list(range(begin, begin + count))


# ----------------------------------------------------------------------------------------------
# Individual scores


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 3x3 Laplacian of a grey uint8 frame: edge energy (seed §2.1 sharpness)."""
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def _dis_flow(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Dense DIS optical flow (H, W, 2) from grey `first` to grey `second`, in pixels. The FAST
    preset recovers pure translations of 0.5-30 px at 480p within 4%, at a quarter of MEDIUM's cost."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
    return dis.calc(np.ascontiguousarray(first), np.ascontiguousarray(second), None)


def mean_flow_magnitude(pairs: list[tuple[np.ndarray, np.ndarray]], flow: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> float:
    """Mean over pairs of the mean per-pixel flow magnitude (pixels per frame)."""
    magnitudes = []
    for first, second in pairs:
        field_ = flow(first, second)  # (H, W, 2)
        magnitudes.append(float(np.sqrt((field_.astype(np.float64) ** 2).sum(-1)).mean()))
    return float(np.mean(magnitudes))


class RaftFlow:
    """torchvision RAFT (large) from a local state dict; imported lazily (torchvision is optional)."""

    def __init__(self, weights: str | os.PathLike):
        weights = Path(weights)
        if not weights.is_file():
            raise MugenError(f"RAFT weights '{weights}' not found; pass a local torchvision raft_large .pth file")
        try:
            import torch
            from torchvision.models.optical_flow import raft_large
        except Exception as error:  # torchvision missing or built for another torch
            raise MugenError(
                f"motion_backend='raft' needs torchvision with optical-flow models ({error}); "
                "install a torchvision matching your torch, or use motion_backend='dis'"
            ) from None
        self._torch = torch
        self.model = raft_large(weights=None, progress=False)
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model.eval()

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        torch = self._torch

        def to_tensor(grey: np.ndarray):
            height, width = grey.shape
            rgb = torch.from_numpy(np.repeat(grey[None], 3, 0)).float().div(127.5).sub(1.0)  # (3, H, W)
            pad_h, pad_w = (-height) % 8, (-width) % 8  # RAFT needs sizes divisible by 8
            return torch.nn.functional.pad(rgb[None], (0, pad_w, 0, pad_h), mode="replicate")  # (1, 3, H', W')

        with torch.inference_mode():
            flows = self.model(to_tensor(first), to_tensor(second))
        height, width = first.shape
        return flows[-1][0, :, :height, :width].permute(1, 2, 0).numpy()  # (H, W, 2)


def border_fraction(greys: list[np.ndarray], dark_level: float = 24.0, flat_std: float = 6.0) -> float:
    """Share of the frame covered by letterbox (top/bottom) and pillarbox (left/right) bars: the
    outer rows/columns that are dark and flat in every sampled frame."""
    stack = np.stack(greys).astype(np.float32)  # (N, H, W)
    height, width = stack.shape[1:]

    def bar_length(lines: np.ndarray) -> int:
        # lines: (N, L, P) outer-to-inner lines of pixels; count leading dark, flat lines
        dark = (lines.mean(axis=2) <= dark_level) & (lines.std(axis=2) <= flat_std)  # (N, L)
        always = dark.all(axis=0)
        return int(np.argmin(always)) if not always.all() else len(always)

    top = bar_length(stack)  # rows from the top
    bottom = bar_length(stack[:, ::-1])
    left = bar_length(stack.transpose(0, 2, 1))
    right = bar_length(stack.transpose(0, 2, 1)[:, ::-1])
    bar_rows = min(height, top + bottom)
    bar_cols = min(width, left + right)
    covered = bar_rows * width + bar_cols * (height - bar_rows)
    return float(covered / (height * width))


def camera_shake(greys: list[np.ndarray], scale: float = 1.0) -> float:
    """Jitter of the global motion over consecutive grey frames: the RMS of the second difference
    of the global translation (phase correlation), in pixels per frame^2, multiplied by `scale`
    (frames analysed at half the processing size pass scale=2). Steady pans score ~0; hand-held
    shake scores high."""
    frames = [grey.astype(np.float32) for grey in greys]
    window = cv2.createHanningWindow(frames[0].shape[::-1], cv2.CV_32F)
    shifts = [cv2.phaseCorrelate(frames[i], frames[i + 1], window)[0] for i in range(len(frames) - 1)]  # per-step (dx, dy)
    velocity = np.asarray(shifts, dtype=np.float64) * scale  # (N-1, 2) pixels per frame
    acceleration = np.diff(velocity, axis=0)  # (N-2, 2)
    return float(np.sqrt((acceleration**2).sum(1).mean())) if len(acceleration) else 0.0


# ----------------------------------------------------------------------------------------------
# Aesthetics (LAION-style: Linear stack over the CLIP image embedding)


class AestheticPredictor:
    """CLIP image embedding (L2-normalised) -> stacked Linear layers -> score (LAION convention).

    The MLP weights are a state dict whose Linear layers appear in order (e.g. `layers.0.weight`,
    `layers.2.weight`, ... of LAION's improved predictor, or a single `weight`/`bias` of the
    linear one); LAION's predictors have no activation between layers, only dropout, so the layers
    are applied one after another.
    """

    def __init__(self, clip_dir: str | os.PathLike, mlp_weights: str | os.PathLike, device: str = "cpu"):
        import torch
        from transformers import CLIPImageProcessor, CLIPModel

        clip_dir, mlp_weights = Path(clip_dir), Path(mlp_weights)
        if not clip_dir.is_dir():
            raise MugenError(f"CLIP directory '{clip_dir}' not found; pass a local transformers CLIPModel folder")
        if not mlp_weights.is_file():
            raise MugenError(f"aesthetic MLP weights '{mlp_weights}' not found; pass a local .safetensors or .pth file")
        self._torch = torch
        self.device = device
        self.model = CLIPModel.from_pretrained(str(clip_dir)).to(device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(str(clip_dir))
        if mlp_weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(mlp_weights))
        else:
            state = torch.load(mlp_weights, map_location="cpu", weights_only=True)
        weight_keys = [key for key in state if key.endswith("weight") and state[key].dim() == 2]
        if not weight_keys:
            raise MugenError(f"aesthetic MLP weights '{mlp_weights}' hold no Linear layer (2-D '*weight' tensors)")
        self.layers = []
        for key in weight_keys:  # insertion order = layer order
            bias_key = key[: -len("weight")] + "bias"
            self.layers.append((state[key].float().to(device), state[bias_key].float().to(device) if bias_key in state else None))
        embed_dim = self.model.config.projection_dim
        if self.layers[0][0].shape[1] != embed_dim or self.layers[-1][0].shape[0] != 1:
            raise MugenError(
                f"aesthetic MLP '{mlp_weights}' maps {self.layers[0][0].shape[1]} -> {self.layers[-1][0].shape[0]}, "
                f"but the CLIP model gives {embed_dim}-d embeddings and one score is expected"
            )

    def __call__(self, rgb_frames: list[np.ndarray]) -> float:
        torch = self._torch
        inputs = self.processor(images=rgb_frames, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            embeddings = self.model.get_image_features(pixel_values=inputs["pixel_values"])  # (N, D)
            if not isinstance(embeddings, torch.Tensor):  # newer transformers may return an output object
                embeddings = embeddings.pooler_output
            hidden = torch.nn.functional.normalize(embeddings.float(), dim=-1)
            for weight, bias in self.layers:
                hidden = torch.nn.functional.linear(hidden, weight, bias)
        return float(hidden.mean())  # mean over the sampled frames


_AESTHETIC_CACHE: dict[tuple[str, str], AestheticPredictor] = {}
_RAFT_CACHE: dict[str, RaftFlow] = {}


def _aesthetic_predictor(config: FilterConfig) -> AestheticPredictor:
    key = (str(config.aesthetic_clip_dir), str(config.aesthetic_mlp_weights))
    if key not in _AESTHETIC_CACHE:
        _AESTHETIC_CACHE[key] = AestheticPredictor(config.aesthetic_clip_dir, config.aesthetic_mlp_weights)
    return _AESTHETIC_CACHE[key]


def _flow_function(config: FilterConfig) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    if config.motion_backend == "raft":
        if config.raft_weights not in _RAFT_CACHE:
            _RAFT_CACHE[config.raft_weights] = RaftFlow(config.raft_weights)
        return _RAFT_CACHE[config.raft_weights]
    return _dis_flow


# ----------------------------------------------------------------------------------------------
# The stage


def processing_size(probe: VideoProbe, short_side: int) -> tuple[int, int]:
    stored_width, stored_height = (probe.height, probe.width) if probe.rotation in (90, 270) else (probe.width, probe.height)
    return size_for_short_side(stored_width, stored_height, short_side)


def _needs_rgb(config: FilterConfig) -> bool:
    return config.aesthetic_clip_dir is not None or bool(config.classifiers)


def _scores_from_frames(
    pairs: list[tuple[int, int]],
    frames: dict[int, np.ndarray],
    shake_frames: list[np.ndarray],
    clip: SceneClip,
    probe: VideoProbe,
    config: FilterConfig,
) -> dict:
    """Scores from the sampled frames: `frames` maps each pair's frame index to a grey (H, W) or
    RGB (H, W, 3) frame at the processing size; `shake_frames` are grey at the shake size."""
    grey = {i: (cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) if f.ndim == 3 else f) for i, f in frames.items()}
    sharpness_values = [laplacian_variance(grey[first]) for first, _ in pairs]
    scores: dict = {
        "sharpness": float(np.median(sharpness_values)),
        "sharpness_min": float(min(sharpness_values)),
        "sharpness_max": float(max(sharpness_values)),
        "motion": mean_flow_magnitude([(grey[a], grey[b]) for a, b in pairs], _flow_function(config)),
        "motion_backend": config.motion_backend,
        "border_fraction": border_fraction([grey[first] for first, _ in pairs]),
        "shake": (
            camera_shake(shake_frames, scale=config.processing_short_side / min(shake_frames[0].shape))
            if len(shake_frames) >= 3
            else None
        ),
    }
    if config.aesthetic_clip_dir is None:
        scores["aesthetic"] = None
        scores["aesthetic_unavailable"] = "no aesthetic_clip_dir / aesthetic_mlp_weights given"
    else:
        scores["aesthetic"] = _aesthetic_predictor(config)([frames[first] for first, _ in pairs])
    for classifier in config.classifiers:
        for label, value in classifier([frames[first] for first, _ in pairs], clip, probe).items():
            scores[f"classifier.{label}"] = float(value)
    return scores


def score_clip(path: str | os.PathLike, probe: VideoProbe, clip: SceneClip, config: FilterConfig) -> dict:
    """All filter scores of one clip, decoding only its sampled frames at the processing size:
    3 pairs at 480p (sharpness, motion, borders, aesthetics, classifiers) and `shake_frames`
    consecutive middle frames at 144p (shake)."""
    pairs = sample_pairs(clip)
    shake_indices = shake_frame_indices(clip, config.shake_frames)
    size = processing_size(probe, config.processing_short_side)
    shake_size = processing_size(probe, config.shake_short_side)
    pair_indices = {i for pair in pairs for i in pair}
    frames = read_frames(path, probe.fps, pair_indices, size=size, pixel_format="rgb24" if _needs_rgb(config) else "gray")
    shake = read_frames(path, probe.fps, shake_indices, size=shake_size, pixel_format="gray")
    missing = sorted((pair_indices - set(frames)) | (set(shake_indices) - set(shake)))
    if missing:
        raise MugenError(f"video '{path}': frames {missing[:5]} of clip {clip.start_frame}-{clip.end_frame} could not be decoded")
    return _scores_from_frames(pairs, frames, [shake[i] for i in shake_indices], clip, probe, config)


def split_and_score(
    path: str | os.PathLike,
    probe: VideoProbe,
    split_config: SceneSplitConfig,
    filter_config: FilterConfig,
    pair_stride: int = 8,
    shake_stride: int = 16,
) -> list[tuple[SceneClip, dict]]:
    """Split and score in ONE decoding pass (what `split_scenes` + `score_clip` per clip do in two).

    Every frame is decoded once. Each is scaled to the small analysis size for the splitter; the
    frames the filters may need are also scaled to the processing size as they go by and kept
    until their clip is final: a pair (i, i + 1) for every i that is a multiple of `pair_stride`,
    and `shake_frames` consecutive frames from every multiple of `shake_stride` (the analysis
    frames themselves, at the default 144p shake size).
    A clip's sample pairs are the grid pairs nearest its start, middle and end (`sample_pairs(clip,
    pair_stride)`), so they sit at most `pair_stride - 1` frames from where `score_clip` samples.
    Kept frames are dropped once the splitter has emitted every clip they could belong to, so
    memory holds at most about one maximum-length clip's grid frames. A clip too short for the
    grid falls back to `score_clip`.
    """
    if pair_stride < 2 or shake_stride < filter_config.shake_frames:
        raise MugenError(
            f"pair_stride={pair_stride} must be >= 2 and shake_stride={shake_stride} >= shake_frames={filter_config.shake_frames}"
        )
    splitter = StreamingSplitter(probe, split_config)
    size = processing_size(probe, filter_config.processing_short_side)
    shake_size = processing_size(probe, filter_config.shake_short_side)
    # The splitter's analysis frames serve the shake estimate when they have its size (the default).
    shake_from_analysis = shake_size == splitter.analysis_size
    pair_format = "rgb24" if _needs_rgb(filter_config) else "gray"
    kept_pairs: dict[int, np.ndarray] = {}
    kept_shake: dict[int, np.ndarray] = {}
    results: list[tuple[SceneClip, dict]] = []

    def score_final(clips: list[SceneClip]) -> None:
        for clip in clips:
            pairs = sample_pairs(clip, pair_stride)
            shake_indices = shake_frame_indices(clip, filter_config.shake_frames, shake_stride)
            wanted = {i for pair in pairs for i in pair}
            if pairs and shake_indices and wanted <= set(kept_pairs) and set(shake_indices) <= set(kept_shake):
                frames = {i: kept_pairs[i] for i in wanted}
                scores = _scores_from_frames(pairs, frames, [kept_shake[i] for i in shake_indices], clip, probe, filter_config)
            else:
                scores = score_clip(path, probe, clip, filter_config)
            results.append((clip, scores))
        for store in (kept_pairs, kept_shake):
            for index in [i for i in store if i < splitter.frontier]:
                del store[index]

    # The loop filter stays on here: the processing-size frames feed the sharpness score.
    for index, frame in iter_video_frames(path, probe.fps):
        if index % pair_stride < 2:
            kept_pairs[index] = convert_frame(frame, size, pair_format)
        analysis = convert_frame(frame, splitter.analysis_size, "bgr24")
        if index % shake_stride < filter_config.shake_frames:
            kept_shake[index] = (
                cv2.cvtColor(analysis, cv2.COLOR_BGR2GRAY) if shake_from_analysis else convert_frame(frame, shake_size, "gray")
            )
        score_final(splitter.push(index, analysis))
    score_final(splitter.finish())
    return results


def _format(value: float) -> str:
    return f"{value:g}"


def filter_reasons(scores: dict, config: FilterConfig) -> list[str]:
    """Why a clip is dropped ([] = keep). Each reason names the score and the bound it broke."""
    reasons = []
    sharp_low, sharp_high = config.sharpness_range
    if scores.get("sharpness_min", scores.get("sharpness")) is not None:
        if scores.get("sharpness_min", scores["sharpness"]) < sharp_low:
            reasons.append(f"sharpness<{_format(sharp_low)}")
        if scores.get("sharpness_max", scores["sharpness"]) > sharp_high:
            reasons.append(f"sharpness>{_format(sharp_high)}")
    motion_low, motion_high = config.motion_range
    motion = scores.get("motion")
    if motion is not None:
        if motion < motion_low:
            reasons.append(f"motion<{_format(motion_low)}")
        if motion > motion_high:
            reasons.append(f"motion>{_format(motion_high)}")
    aesthetic = scores.get("aesthetic")
    if aesthetic is not None and aesthetic < config.aesthetic_min:
        reasons.append(f"aesthetic<{_format(config.aesthetic_min)}")
    if scores.get("border_fraction") is not None and scores["border_fraction"] > config.border_max_fraction:
        reasons.append(f"border_fraction>{_format(config.border_max_fraction)}")
    if scores.get("shake") is not None and scores["shake"] > config.shake_max:
        reasons.append(f"shake>{_format(config.shake_max)}")
    for label, limit in config.classifier_max_scores.items():
        value = scores.get(f"classifier.{label}")
        if value is not None and not math.isnan(value) and value > limit:
            reasons.append(f"{label}>{_format(limit)}")
    return reasons
