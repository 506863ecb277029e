"""Stage 2 of curation: split a video into single-shot clips (seed §2.1 "Video splitting").

One decoding pass over the video at a small analysis size (short side 144 px by default, scaled
inside FFmpeg) feeds two detectors frame by frame:

- PySceneDetect's `ContentDetector` (or `AdaptiveDetector`) for hard cuts;
- our `GradualTransitionDetector` (colour + structure features, SVM; see `transitions.py`) for
  fades and dissolves, which a frame-difference detector misses.

Shots are the frames between cuts minus every transition (plus a small margin); each shot is cut
into clips of at most `max_clip_s` seconds, and pieces shorter than `min_clip_s` are dropped, so a
clip never straddles a cut or a transition. Thresholds can differ per data source
(`SceneSplitConfig.source_overrides`), as the seed tunes them per source.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector

from mugen.data.curation.decode import iter_frames, size_for_short_side
from mugen.data.curation.probe import VideoProbe
from mugen.data.curation.transitions import GradualTransitionDetector, load_transition_svm
from mugen.errors import MugenError

CUT_DETECTORS = ("content", "adaptive")


@dataclass(frozen=True)
class SceneClip:
    """Frames [start_frame, end_frame) of a source video, one shot, no transition inside."""

    start_frame: int
    end_frame: int  # exclusive
    fps: float

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame

    @property
    def start_s(self) -> float:
        return self.start_frame / self.fps

    @property
    def end_s(self) -> float:
        return self.end_frame / self.fps

    def to_dict(self) -> dict:
        return {"start_frame": self.start_frame, "end_frame": self.end_frame, "fps": self.fps}


@dataclass
class SceneSplitConfig:
    """How to split videos into clips; `for_source(name)` applies that source's overrides."""

    cut_detector: str = "content"  # "content" (ContentDetector) or "adaptive" (AdaptiveDetector)
    cut_threshold: float = 27.0  # ContentDetector: mean HSV change (0-255) that makes a cut
    adaptive_threshold: float = 3.0  # AdaptiveDetector: frame score / neighbours' average
    min_cut_gap_frames: int = 8  # cuts closer than this are merged (flash suppression)
    detect_transitions: bool = True  # run the gradual-transition SVM
    transition_threshold: float = 0.0  # SVM decision above which a frame is inside a transition
    transition_min_frames: int = 3  # shorter positive runs are ignored
    transition_margin_frames: int = 2  # frames dropped on each side of a detected transition
    transition_weights: str | None = None  # JSON weights; None = the ones shipped with mugen
    min_clip_s: float = 1.0  # shorter pieces are dropped
    max_clip_s: float = 10.0  # longer shots are cut into pieces of at most this length
    analysis_short_side: int = 144  # frames are analysed at this short side (pixels)
    source_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cut_detector not in CUT_DETECTORS:
            raise MugenError(f"cut_detector={self.cut_detector!r} is unknown; use one of {CUT_DETECTORS}")
        if not 0 < self.min_clip_s <= self.max_clip_s:
            raise MugenError(
                f"min_clip_s={self.min_clip_s} and max_clip_s={self.max_clip_s} must satisfy 0 < min <= max"
            )
        if self.analysis_short_side < 16:
            raise MugenError(f"analysis_short_side={self.analysis_short_side} is too small; use at least 16 pixels")
        known = {f.name for f in dataclasses.fields(self)} - {"source_overrides"}
        for source, overrides in self.source_overrides.items():
            unknown = set(overrides) - known
            if unknown:
                raise MugenError(
                    f"source_overrides[{source!r}] sets unknown fields {sorted(unknown)}; valid: {sorted(known)}"
                )

    def for_source(self, name: str | None) -> "SceneSplitConfig":
        """This config with the overrides for source `name` applied (itself if there are none)."""
        overrides = self.source_overrides.get(name or "", {})
        return dataclasses.replace(self, **overrides) if overrides else self


def _make_cut_detector(config: SceneSplitConfig):
    if config.cut_detector == "adaptive":
        return AdaptiveDetector(adaptive_threshold=config.adaptive_threshold, min_scene_len=config.min_cut_gap_frames)
    return ContentDetector(threshold=config.cut_threshold, min_scene_len=config.min_cut_gap_frames)


@dataclass
class SceneBoundaries:
    """What the detectors found in one video: cut frames (a new shot starts there) and transitions."""

    num_frames: int
    cuts: list[int]
    transitions: list[tuple[int, int]]  # [start, end) frames


def _pieces(lo: int, hi: int, cuts, blocked, min_frames: int, max_frames: int, at_end: bool):
    """Clips of frames [lo, hi): usable runs (outside `blocked` intervals) split at `cuts`, cut
    greedily into pieces of at most max_frames from each shot start. -> [(start, end, final)]:
    a piece is final when its end is a known boundary (end < hi), it is full length, or at_end."""
    usable = np.ones(max(hi - lo, 0), dtype=bool)
    for start, end in blocked:
        usable[max(start, lo) - lo : max(min(end, hi) - lo, 0)] = False
    cut_set = {cut for cut in cuts if lo < cut < hi}
    pieces, shot_start = [], None
    for index in range(lo, hi + 1):
        ends_here = index == hi or not usable[index - lo] or index in cut_set
        if ends_here and shot_start is not None:
            for piece_start in range(shot_start, index, max_frames):
                piece_end = min(index, piece_start + max_frames)
                final = at_end or piece_end < hi or piece_end - piece_start == max_frames
                pieces.append((piece_start, piece_end, final))
            shot_start = None
        if index < hi and usable[index - lo] and shot_start is None:
            shot_start = index
    return pieces


def _clip_frame_limits(fps: float, config: SceneSplitConfig) -> tuple[int, int]:
    min_frames = max(1, int(round(config.min_clip_s * fps)))
    return min_frames, max(min_frames, int(round(config.max_clip_s * fps)))


def _blocked(transitions, margin: int) -> list[tuple[int, int]]:
    return [(max(0, start - margin), end + margin) for start, end in transitions]


def boundaries_to_clips(boundaries: SceneBoundaries, fps: float, config: SceneSplitConfig) -> list[SceneClip]:
    """Shots between cuts, minus transitions (+ margin), cut into clips of [min_clip_s, max_clip_s]."""
    min_frames, max_frames = _clip_frame_limits(fps, config)
    blocked = _blocked(boundaries.transitions, config.transition_margin_frames)
    pieces = _pieces(0, boundaries.num_frames, boundaries.cuts, blocked, min_frames, max_frames, at_end=True)
    return [SceneClip(start, end, fps) for start, end, _ in pieces if end - start >= min_frames]


class StreamingSplitter:
    """The splitting stage as a stream: `push(index, bgr)` each analysis frame in order; it returns
    the clips that became final (no later frame can change them), so a caller can score and forget
    them while decoding goes on; `finish()` returns the rest. Memory: the transition detector's
    window plus 8 bytes per frame of SVM decisions."""

    # Frames between resolutions of final clips (resolving is cheap, but not free).
    RESOLVE_EVERY = 16
    # Transition runs are recomputed from this many frames before the frontier: a run cut there
    # is long enough to survive the minimum-length rule.
    RUN_LOOKBACK = 256

    def __init__(self, probe: VideoProbe, config: SceneSplitConfig):
        self.fps = probe.fps
        self.config = config
        stored_width, stored_height = (probe.height, probe.width) if probe.rotation in (90, 270) else (probe.width, probe.height)
        short_side = min(config.analysis_short_side, stored_width, stored_height)
        self.analysis_size = size_for_short_side(stored_width, stored_height, short_side)
        self.cut_detector = _make_cut_detector(config)
        self.transition_detector = (
            GradualTransitionDetector(
                load_transition_svm(config.transition_weights),
                threshold=config.transition_threshold,
                min_length=config.transition_min_frames,
            )
            if config.detect_transitions
            else None
        )
        self.min_frames, self.max_frames = _clip_frame_limits(self.fps, config)
        self.cuts: list[int] = []
        self.frames = 0
        self.frontier = 0  # every frame before this belongs to an emitted clip or was dropped
        self._finished = False

    def _settled(self) -> int:
        """Frames before this index can no longer change: cuts are reported with a delay of up to
        the flash filter's length, and transition runs need a few decided frames after them."""
        settled = self.frames - 2 * self.config.min_cut_gap_frames - 4
        if self.transition_detector is not None:
            detector = self.transition_detector
            settled = min(
                settled,
                detector.decided - detector.merge_gap - detector.min_length - self.config.transition_margin_frames - 1,
            )
        return settled

    def _resolve(self, hi: int, at_end: bool) -> list[SceneClip]:
        if hi <= self.frontier:
            return []
        transitions = (
            self.transition_detector.intervals(max(0, self.frontier - self.RUN_LOOKBACK))
            if self.transition_detector is not None
            else []
        )
        blocked = _blocked(transitions, self.config.transition_margin_frames)
        pieces = _pieces(self.frontier, hi, self.cuts, blocked, self.min_frames, self.max_frames, at_end)
        clips = [SceneClip(start, end, self.fps) for start, end, final in pieces if final and end - start >= self.min_frames]
        pending = [start for start, _, final in pieces if not final]
        self.frontier = pending[0] if pending else hi
        return clips

    def push(self, index: int, bgr) -> list[SceneClip]:
        timecode = FrameTimecode(index, self.fps)
        self.cuts += [cut.frame_num for cut in self.cut_detector.process_frame(timecode, bgr)]
        if self.transition_detector is not None:
            self.transition_detector.push(bgr)
        self.frames = index + 1
        if self.frames % self.RESOLVE_EVERY:
            return []
        return self._resolve(self._settled(), at_end=False)

    def finish(self) -> list[SceneClip]:
        if self.frames > 0:
            self.cuts += [cut.frame_num for cut in self.cut_detector.post_process(FrameTimecode(self.frames - 1, self.fps))]
        if self.transition_detector is not None:
            self.transition_detector.finish()
        self._finished = True
        return self._resolve(self.frames, at_end=True)

    def boundaries(self) -> SceneBoundaries:
        """Everything detected (after `finish`)."""
        transitions = self.transition_detector.intervals() if self.transition_detector is not None else []
        cuts = sorted(set(cut for cut in self.cuts if 0 < cut < self.frames))
        return SceneBoundaries(num_frames=self.frames, cuts=cuts, transitions=transitions)


def _split_pass(path: str | os.PathLike, probe: VideoProbe, config: SceneSplitConfig) -> tuple[list[SceneClip], SceneBoundaries]:
    splitter = StreamingSplitter(probe, config)
    clips: list[SceneClip] = []
    # Deblocking non-reference frames changes nothing visible at 1/5 scale; skipping it is free speed.
    for index, bgr in iter_frames(path, probe.fps, size=splitter.analysis_size, pixel_format="bgr24", skip_loop_filter=True):
        clips += splitter.push(index, bgr)
    clips += splitter.finish()
    return clips, splitter.boundaries()


def detect_boundaries(path: str | os.PathLike, probe: VideoProbe, config: SceneSplitConfig) -> SceneBoundaries:
    """One decoding pass at the analysis size: hard cuts (PySceneDetect) + gradual transitions (SVM)."""
    return _split_pass(path, probe, config)[1]


def split_scenes(path: str | os.PathLike, probe: VideoProbe, config: SceneSplitConfig) -> list[SceneClip]:
    """Split the video at `path` into clips that each hold one shot and no transition."""
    return _split_pass(path, probe, config)[0]
