"""The procedural detector reads colour, shape and direction back from rendered clips."""

import cv2
import numpy as np
import pytest
import torch

from mugen.data.synthetic import ProceduralSpec, all_specs, render_procedural_clip
from mugen.eval.procedural import detect_procedural, score_adherence
from mugen.errors import MugenError


def blur(video, sigma=1.0):
    frames = video.permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
    blurred = np.stack([cv2.GaussianBlur(frame, (5, 5), sigma) for frame in frames])
    return torch.from_numpy(blurred).permute(3, 0, 1, 2)


def accuracy(videos, specs):
    scores = score_adherence(videos, specs)
    return {key: scores[key] for key in ("colour", "shape", "direction", "all")}


@pytest.mark.parametrize("size,frames", [(32, 8), (64, 16), (48, 12)])
def test_detector_reads_every_spec_of_clean_clips(size, frames):
    specs = all_specs()
    videos = [render_procedural_clip(spec, frames, size, size, seed=i) for i, spec in enumerate(specs)]
    result = accuracy(videos, specs)
    assert min(result.values()) >= 0.95, result


def test_detector_is_robust_to_noise_and_blur():
    generator = torch.Generator().manual_seed(0)
    specs = all_specs()
    videos = []
    for i, spec in enumerate(specs):
        clip = render_procedural_clip(spec, 8, 32, 40, seed=100 + i)
        if i % 2:
            clip = blur(clip)
        clip = clip + 0.1 * torch.randn(clip.shape, generator=generator)
        videos.append(clip)
    result = accuracy(videos, specs)
    assert min(result.values()) >= 0.95, result


def test_wrong_labels_score_zero_and_rows_explain():
    spec = ProceduralSpec("square", "blue", "right")
    clip = render_procedural_clip(spec, 8, 32, 32, seed=0)
    wrong = ProceduralSpec("circle", "red", "left")
    scores = score_adherence([clip, clip], [spec, wrong])
    assert scores["num_samples"] == 2 and scores["all"] == 0.5
    assert scores["colour"] == scores["shape"] == scores["direction"] == 0.5
    row = scores["rows"][1]
    assert row["detected"] == {"colour": "blue", "shape": "square", "direction": "right"}
    assert row["correct"] == {"colour": False, "shape": False, "direction": False, "all": False}
    with pytest.raises(MugenError, match="one spec per video"):
        score_adherence([clip], [spec, spec])


def test_still_shape_has_no_direction_and_empty_clip_has_nothing():
    moving = render_procedural_clip(ProceduralSpec("circle", "green", "up"), 8, 32, 32, seed=0)
    still = moving[:, 3:4].expand(-1, 8, -1, -1)  # one frame repeated: no motion
    found = detect_procedural(still)
    assert (found.colour, found.shape, found.direction) == ("green", "circle", None)
    empty = torch.full((3, 8, 32, 32), -0.8)
    found = detect_procedural(empty + 0.02 * torch.randn(empty.shape, generator=torch.Generator().manual_seed(1)))
    assert (found.colour, found.shape, found.direction) == (None, None, None)


def test_grey_shape_has_no_colour():
    clip = render_procedural_clip(ProceduralSpec("square", "red", "left"), 8, 32, 32, seed=2)
    grey = clip.mean(dim=0, keepdim=True).expand(3, -1, -1, -1)
    found = detect_procedural(grey)
    assert found.colour is None and found.shape == "square" and found.direction == "left"


def test_detector_rejects_wrong_layout():
    with pytest.raises(MugenError, match=r"\(3, T, H, W\)"):
        detect_procedural(torch.zeros(8, 3, 32, 32))
