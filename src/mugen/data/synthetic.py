"""Procedural text-to-video data: one coloured shape moving across a dark background.

Every clip has an exact caption ("a red circle moving left on a dark background"), so a model
trained on it can be checked without a learned judge: `mugen.eval.procedural` reads colour, shape
and direction back out of a generated clip. This is the offline stand-in for the report's
caption-video pairs (seed §2.1): small enough to learn on a CPU, with captions that are never
wrong.

Rendering is analytic: each pixel's coverage by the shape is measured on a 4x4 sub-pixel grid
(`shape_coverage`), so edges are anti-aliased and a shape moves smoothly by fractions of a pixel.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from mugen.errors import MugenError

# Well separated hues (red 0 deg, yellow ~54 deg, green ~128 deg, blue ~225 deg), all bright and
# saturated so they stand far from the dark grey background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "yellow": (235, 210, 40),
    "green": (45, 200, 70),
    "blue": (55, 105, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Unit (dx, dy) in image coordinates: x grows to the right, y grows downwards.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}

_SUPERSAMPLING = 4  # sub-pixel samples per pixel side for anti-aliased coverage
_SIZE_RANGE = (0.28, 0.34)  # shape extent (diameter / side / base) as a fraction of the short side
_TRAVEL_RANGE = (0.32, 0.45)  # distance moved over the clip, as a fraction of the frame along the motion
_BACKGROUND_RANGE = (15, 45)  # background grey level (0-255)
_EDGE_MARGIN = 0.05  # gap kept between the shape and the frame edges, as a fraction of the short side


@dataclass(frozen=True)
class ProceduralSpec:
    """What a procedural clip shows; its caption is exact by construction."""

    shape: str
    colour: str
    direction: str

    def __post_init__(self) -> None:
        for value, allowed, name in (
            (self.shape, SHAPES, "shape"),
            (self.colour, tuple(COLOURS), "colour"),
            (self.direction, tuple(DIRECTIONS), "direction"),
        ):
            if value not in allowed:
                raise MugenError(f"{name} '{value}' is unknown; choose one of {', '.join(allowed)}")

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a dark background"


def all_specs() -> list[ProceduralSpec]:
    """Every (shape, colour, direction) combination, in a fixed order."""
    return [
        ProceduralSpec(shape=shape, colour=colour, direction=direction)
        for shape, colour, direction in itertools.product(SHAPES, COLOURS, DIRECTIONS)
    ]


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, half: float) -> np.ndarray:
    """Boolean mask of sample points (x, y) inside `shape` centred at (cx, cy) with half-extent `half`."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upward-pointing isosceles triangle in the box [-half, half]^2: apex at the top centre,
    # base along the bottom edge. Inside when below the apex and within both slanted edges.
    depth = (dy + half) / (2.0 * half)  # 0 at the apex row, 1 at the base row
    return (depth >= 0.0) & (depth <= 1.0) & (np.abs(dx) <= half * depth)


def shape_coverage(
    shape: str, height: int, width: int, centre_x: float, centre_y: float, half_extent: float
) -> np.ndarray:
    """Fraction of each pixel covered by `shape`, (H, W) in [0, 1].

    The shape's bounding box is centred at (centre_x, centre_y) in pixel units (pixel (i, j)
    spans [j, j+1) x [i, i+1)) and has half-width = half-height = `half_extent`. Coverage is
    measured on a 4x4 sub-pixel grid, which anti-aliases the edges.
    """
    if shape not in SHAPES:
        raise MugenError(f"shape '{shape}' is unknown; choose one of {', '.join(SHAPES)}")
    coverage = np.zeros((height, width))
    # Only pixels in the shape's bounding box (plus one) can be covered; sample just those.
    top, bottom = max(0, math.floor(centre_y - half_extent) - 1), min(height, math.ceil(centre_y + half_extent) + 1)
    left, right = max(0, math.floor(centre_x - half_extent) - 1), min(width, math.ceil(centre_x + half_extent) + 1)
    if top >= bottom or left >= right:
        return coverage
    offsets = (np.arange(_SUPERSAMPLING) + 0.5) / _SUPERSAMPLING
    ys = (np.arange(top, bottom)[:, None] + offsets[None, :]).reshape(-1)  # (h*S,)
    xs = (np.arange(left, right)[:, None] + offsets[None, :]).reshape(-1)  # (w*S,)
    inside = _inside(shape, xs[None, :], ys[:, None], centre_x, centre_y, half_extent)  # (h*S, w*S)
    coverage[top:bottom, left:right] = inside.reshape(
        bottom - top, _SUPERSAMPLING, right - left, _SUPERSAMPLING
    ).mean(axis=(1, 3))  # (h, w)
    return coverage  # (H, W)


def render_procedural_clip(
    spec: ProceduralSpec, num_frames: int, height: int, width: int, seed: int = 0
) -> Tensor:
    """Render `spec` as a (3, T, H, W) clip in [-1, 1].

    The seed varies the start position, the shape's size (28-34% of the short side), how far it
    travels (32-45% of the frame along the motion) and the background shade. The shape stays
    fully inside the frame, clear of its edges, for the whole clip.
    """
    if num_frames < 1 or height < 8 or width < 8:
        raise MugenError(
            f"procedural clip size {num_frames}x{height}x{width} is too small; use at least 1 frame of 8x8"
        )
    rng = np.random.default_rng(seed)
    half = 0.5 * rng.uniform(*_SIZE_RANGE) * min(height, width)
    background = rng.uniform(*_BACKGROUND_RANGE)
    dx, dy = DIRECTIONS[spec.direction]
    extent_along = width if dx else height
    travel = rng.uniform(*_TRAVEL_RANGE) * extent_along

    # Centre positions that keep the whole shape in view, a small margin away from the edges.
    margin = _EDGE_MARGIN * min(height, width)

    def start_coordinate(size: float, moves: float) -> float:
        low, high = half + margin, size - half - margin - abs(moves) * travel
        start = rng.uniform(low, high)
        return start + travel if moves < 0 else start

    start_x = start_coordinate(width, dx)
    start_y = start_coordinate(height, dy)
    progress = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    centres = [(start_x + dx * travel * p, start_y + dy * travel * p) for p in progress]

    colour = np.asarray(COLOURS[spec.colour], dtype=np.float64)
    frames = np.empty((num_frames, height, width, 3), dtype=np.float64)
    for t, (cx, cy) in enumerate(centres):
        coverage = shape_coverage(spec.shape, height, width, cx, cy, half)  # (H, W)
        frames[t] = background + coverage[..., None] * (colour - background)  # (H, W, 3)
    video = torch.from_numpy(frames).float().permute(3, 0, 1, 2)  # (3, T, H, W) in 0..255
    return (video / 127.5 - 1.0).contiguous()


def procedural_dataset(
    num_clips: int, num_frames: int, height: int, width: int, seed: int = 0
) -> list[tuple[Tensor, str, ProceduralSpec]]:
    """`num_clips` (clip, caption, spec) triples covering the specs evenly.

    Specs are dealt from shuffled passes over `all_specs()`, so every combination appears
    `num_clips // len(all_specs())` or one more times. Clip i's rendering seed depends only on
    (seed, i), so a smaller dataset is a prefix of a larger one with the same seed.
    """
    if num_clips < 1:
        raise MugenError(f"num_clips={num_clips} must be at least 1")
    shuffle = np.random.default_rng(seed)
    specs = all_specs()
    order: list[ProceduralSpec] = []
    while len(order) < num_clips:
        order.extend(specs[i] for i in shuffle.permutation(len(specs)))
    dataset = []
    for index in tqdm(range(num_clips), desc="rendering procedural clips", leave=False, disable=num_clips < 256):
        spec = order[index]
        clip_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        clip = render_procedural_clip(spec, num_frames, height, width, seed=clip_seed)
        dataset.append((clip, spec.caption(), spec))
    return dataset
