"""Data curation (seed §2.1): raw videos -> probed, split, scored clips.

Stages, each usable on its own:
    probe      `probe_video` -> `VideoProbe`, or `CurationReject` with a reason code
    decode     only the frames a stage needs, scaled inside FFmpeg (`iter_frames`, `read_frames`)
    scenes     `split_scenes` -> `SceneClip`s (PySceneDetect cuts + gradual-transition SVM)
    filters    `score_clip` -> scores; `filter_reasons` -> why a clip is dropped;
               `split_and_score` splits and scores in one decoding pass
"""

from mugen.data.curation.filters import (
    ClipClassifier,
    FilterConfig,
    filter_reasons,
    make_classifier,
    register_classifier,
    score_clip,
    split_and_score,
)
from mugen.data.curation.probe import CurationReject, VideoProbe, probe_video
from mugen.data.curation.scenes import SceneClip, SceneSplitConfig, split_scenes

__all__ = [
    "ClipClassifier",
    "CurationReject",
    "FilterConfig",
    "SceneClip",
    "SceneSplitConfig",
    "VideoProbe",
    "filter_reasons",
    "make_classifier",
    "probe_video",
    "register_classifier",
    "score_clip",
    "split_and_score",
    "split_scenes",
]
