"""Curation settings under which the small synthetic test videos keep their clips."""

from mugen.data.curation.filters import FilterConfig
from mugen.data.curation.pipeline import CurationConfig
from mugen.data.curation.scenes import SceneSplitConfig


def lenient_config() -> CurationConfig:
    return CurationConfig(
        # transitions off: these tests are about orchestration, not the transition SVM (tested by its own tests)
        split=SceneSplitConfig(min_clip_s=0.4, max_clip_s=1.0, analysis_short_side=48, detect_transitions=False),
        filter=FilterConfig(sharpness_range=(0.0, 1e9), motion_range=(0.0, 1e9), processing_short_side=96, shake_short_side=48, shake_max=1e9),
    )
