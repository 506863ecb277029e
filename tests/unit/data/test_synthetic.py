"""Procedural clips: shapes, value range, exact captions, motion direction, dataset balance."""

import colorsys
from collections import Counter

import numpy as np
import pytest
import torch

from mugen.data.synthetic import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    ProceduralSpec,
    all_specs,
    procedural_dataset,
    render_procedural_clip,
    shape_coverage,
)
from mugen.errors import MugenError


def foreground(clip):
    """(T, H, W) weights: distance of each pixel from the clip's median (background) colour."""
    background = clip.flatten(1).median(dim=1).values[:, None, None, None]
    return (clip - background).norm(dim=0)


def centroids(clip):
    weight = foreground(clip)  # (T, H, W)
    T, H, W = weight.shape
    ys = torch.arange(H, dtype=torch.float32)[None, :, None]
    xs = torch.arange(W, dtype=torch.float32)[None, None, :]
    mass = weight.sum(dim=(1, 2))
    return (weight * xs).sum(dim=(1, 2)) / mass, (weight * ys).sum(dim=(1, 2)) / mass


def test_palette_and_vocabulary():
    assert len(COLOURS) >= 4 and len(SHAPES) >= 3 and set(DIRECTIONS) == {"left", "right", "up", "down"}
    hues = sorted(colorsys.rgb_to_hsv(*(np.array(rgb) / 255))[0] * 360 for rgb in COLOURS.values())
    gaps = np.diff(hues + [hues[0] + 360])
    assert gaps.min() >= 45, f"palette hues too close: {hues}"
    for dx, dy in DIRECTIONS.values():
        assert dx * dx + dy * dy == pytest.approx(1.0)
    assert len(all_specs()) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) == len(set(all_specs()))


def test_caption_is_exact_and_bad_specs_are_refused():
    assert ProceduralSpec("circle", "red", "left").caption() == "a red circle moving left on a dark background"
    with pytest.raises(MugenError, match="colour 'purple'"):
        ProceduralSpec("circle", "purple", "left")
    with pytest.raises(MugenError, match="shape 'hexagon'"):
        ProceduralSpec("hexagon", "red", "left")


@pytest.mark.parametrize("spec", all_specs()[::5], ids=lambda s: s.caption().replace(" ", "_")[:40])
def test_render_shape_range_colour_and_motion(spec):
    clip = render_procedural_clip(spec, num_frames=10, height=32, width=40, seed=3)
    assert clip.shape == (3, 10, 32, 40) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    # Background is a dark grey; the brightest pixels carry the spec's colour exactly.
    background = clip.flatten(1).median(dim=1).values
    assert torch.allclose(background, background.mean().expand(3), atol=1e-6) and background.mean() < -0.6
    expected = torch.tensor(COLOURS[spec.colour]) / 127.5 - 1
    weight = foreground(clip)
    core = weight >= weight.max() - 1e-4
    assert torch.allclose(clip.permute(1, 2, 3, 0)[core].mean(dim=0), expected, atol=1e-3)
    # The shape moves along its direction by a clear margin and never leaves the frame.
    cx, cy = centroids(clip)
    dx, dy = DIRECTIONS[spec.direction]
    along = (cx[-1] - cx[0]) * dx + (cy[-1] - cy[0]) * dy
    across = abs((cx[-1] - cx[0]) * dy - (cy[-1] - cy[0]) * dx)
    assert along > 0.25 * (40 if dx else 32) and across < 0.5
    mass = weight.sum(dim=(1, 2))
    assert (mass / mass.mean() - 1).abs().max() < 0.05  # same area every frame: fully visible
    edges = torch.cat([weight[:, 0], weight[:, -1], weight[:, :, 0], weight[:, :, -1]], dim=1)
    assert edges.max() < 1e-4


def test_shape_size_and_fill_match_the_shape():
    # Coverage area relative to the bounding box: square 1, circle pi/4, triangle 1/2.
    half = 10.0
    expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    for shape, ratio in expected.items():
        coverage = shape_coverage(shape, 64, 64, 31.3, 30.7, half)
        assert coverage.sum() / (2 * half) ** 2 == pytest.approx(ratio, rel=0.02)
        assert coverage.min() >= 0 and coverage.max() <= 1
    clip = render_procedural_clip(ProceduralSpec("square", "blue", "up"), 4, 60, 60, seed=1)
    side = np.sqrt(float((foreground(clip)[0] / foreground(clip).max()).sum()))
    assert 0.25 * 60 <= side <= 0.35 * 60


def test_render_is_deterministic_and_seed_varies_it():
    spec = ProceduralSpec("triangle", "yellow", "down")
    a = render_procedural_clip(spec, 6, 32, 32, seed=7)
    assert torch.equal(a, render_procedural_clip(spec, 6, 32, 32, seed=7))
    assert not torch.equal(a, render_procedural_clip(spec, 6, 32, 32, seed=8))
    with pytest.raises(MugenError, match="too small"):
        render_procedural_clip(spec, 0, 32, 32)


def test_procedural_dataset_is_balanced_and_captioned():
    data = procedural_dataset(num_clips=2 * len(all_specs()) + 5, num_frames=3, height=16, width=16, seed=1)
    assert len(data) == 2 * len(all_specs()) + 5
    counts = Counter(spec for _, _, spec in data)
    assert set(counts) == set(all_specs()) and set(counts.values()) <= {2, 3}
    for clip, caption, spec in data[:10]:
        assert clip.shape == (3, 3, 16, 16) and caption == spec.caption()
    again = procedural_dataset(num_clips=5, num_frames=3, height=16, width=16, seed=1)
    assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(data[:5], again))
