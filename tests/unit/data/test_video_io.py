"""Video/image I/O: MP4 round trip, probing, frame selection, resizing, bad files, atomic writes."""

import math
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
import torch

from mugen.data import write_atomically
from mugen.data.video_io import (
    VIDEO_EXTENSIONS,
    probe_video,
    read_image,
    read_video,
    resize_center_crop,
    video_to_uint8,
    write_contact_sheet,
    write_video,
)
from mugen.errors import MugenError


def smooth_video(frames=12, height=48, width=64):
    """Low-frequency colour waves that drift over time: easy for H.264, so PSNR is high."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(-1, 1, height)[None, :, None]
    x = torch.linspace(-1, 1, width)[None, None, :]
    zeros = torch.zeros(frames, height, width)
    return torch.stack([
        0.7 * torch.sin(3 * x + 2 * t) + zeros,
        0.7 * torch.cos(2 * y - t) + zeros,
        0.6 * x * y + 0.2 * t + zeros,
    ])  # (3, T, H, W)


def psnr(a, b):
    return 10 * math.log10(4.0 / float(((a - b) ** 2).mean()))


def frame_numbered_video(frames=20, size=32):
    """Frame i is a flat grey of level 10 * i (0..255 scale): the decoded level names the frame."""
    levels = torch.arange(frames, dtype=torch.float32) * 10 / 127.5 - 1
    return levels[None, :, None, None].expand(3, frames, size, size).contiguous()


def frame_ids(video):
    return [round((float(video[:, t].mean()) + 1) * 127.5 / 10) for t in range(video.shape[1])]


@pytest.fixture
def smooth_mp4(tmp_path):
    video = smooth_video()
    return write_video(tmp_path / "smooth.mp4", video, fps=24), video


def test_round_trip_psnr_and_probe(smooth_mp4):
    path, video = smooth_mp4
    decoded, fps = read_video(path)
    assert decoded.shape == video.shape and fps == pytest.approx(24.0)
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert psnr(decoded, video) > 30
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height, info.codec, info.rotation) == (12, 64, 48, "h264", 0)
    assert info.fps == pytest.approx(24.0)
    assert info.duration == pytest.approx(12 / 24, abs=0.02)


def test_frames_are_counted_when_the_container_has_no_count(tmp_path):
    path = write_video(tmp_path / "clip.mkv", frame_numbered_video(frames=7, size=16), fps=10)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska headers carry no frame count
    info = probe_video(path)
    assert info.num_frames == 7 and info.duration == pytest.approx(0.7, abs=0.05)
    assert read_video(path)[0].shape[1] == 7


def test_ntsc_frame_rate_survives(tmp_path):
    path = write_video(tmp_path / "ntsc.mp4", smooth_video(frames=4, height=16, width=16), fps=30000 / 1001)
    assert probe_video(path).fps == pytest.approx(29.97, abs=1e-3)


def test_start_stride_and_count_pick_the_right_frames(tmp_path):
    path = write_video(tmp_path / "numbers.mp4", frame_numbered_video(), fps=10, crf=0)
    everything, _ = read_video(path)
    assert frame_ids(everything) == list(range(20))
    clip, fps = read_video(path, num_frames=4, start_frame=3, frame_stride=2)
    assert frame_ids(clip) == [3, 5, 7, 9] and fps == pytest.approx(5.0)
    tail, _ = read_video(path, start_frame=17)
    assert frame_ids(tail) == [17, 18, 19]
    with pytest.raises(MugenError, match="too few"):
        read_video(path, num_frames=5, start_frame=15, frame_stride=2)
    with pytest.raises(MugenError, match="frame_stride"):
        read_video(path, frame_stride=0)


def test_read_with_size_resizes_short_side_then_crops_centre(tmp_path):
    # Left third red, middle third green, right third blue; a square crop keeps only the middle.
    video = -torch.ones(3, 2, 32, 96)
    for channel in range(3):
        video[channel, :, :, channel * 32 : (channel + 1) * 32] = 1
    path = write_video(tmp_path / "bars.mp4", video, fps=8, crf=0)
    clip, _ = read_video(path, size=(16, 16))
    assert clip.shape == (3, 2, 16, 16)
    mean_rgb = clip.mean(dim=(1, 2, 3))
    assert mean_rgb[1] > 0.8 and mean_rgb[0] < -0.8 and mean_rgb[2] < -0.8


def test_resize_center_crop_on_images_and_videos():
    image = torch.linspace(-1, 1, 40)[None, None, :].expand(3, 20, 40)  # brightness grows left to right
    out = resize_center_crop(image, (10, 10))
    assert out.shape == (3, 10, 10)
    # Scaling by 1/2 keeps the middle 20 source columns (10..30): values stay inside that band.
    assert out.min() > image[0, 0, 9] and out.max() < image[0, 0, 30]
    video = torch.rand(3, 5, 12, 18) * 2 - 1
    assert resize_center_crop(video, (24, 24)).shape == (3, 5, 24, 24)
    assert torch.equal(resize_center_crop(video, (12, 18)), video)
    with pytest.raises(MugenError, match="size"):
        resize_center_crop(video, (0, 8))


def test_rotated_video_is_returned_upright(tmp_path):
    # Stored 16 wide x 32 tall with a bright top half; the display matrix turns it 90 deg CCW,
    # so a player shows it 32 wide x 16 tall with the bright half on the left.
    stored = np.zeros((32, 16, 3), np.uint8)
    stored[:16] = 255
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = 16, 32, "yuv420p"
        stream.set_display_rotation(90)
        for index in range(3):
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    info = probe_video(path)
    assert (info.rotation, info.width, info.height) == (90, 32, 16)
    clip, _ = read_video(path)
    assert clip.shape == (3, 3, 16, 32)
    assert clip[:, :, :, :12].mean() > 0.8 and clip[:, :, :, 20:].mean() < -0.8


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), id="random-bytes"),
        pytest.param(lambda p: p.write_text("this is a text file, not a video\n" * 20), id="text"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
    ],
)
def test_files_that_are_not_videos_are_reported(tmp_path, make):
    path = tmp_path / "bad.mp4"
    make(path)
    for read in (probe_video, read_video):
        with pytest.raises(MugenError, match="bad.mp4.*unreadable or corrupt"):
            read(path)


def test_truncated_mp4_is_reported(smooth_mp4, tmp_path):
    path, _ = smooth_mp4
    data = path.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    for read in (probe_video, read_video):
        with pytest.raises(MugenError, match="truncated.mp4.*(truncated|corrupt)"):
            read(truncated)


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(MugenError, match="not found"):
        probe_video(tmp_path / "nope.mp4")
    with pytest.raises(MugenError, match="not found"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(MugenError, match="not found"):
        read_image(tmp_path / "nope.png")


def test_odd_sizes_are_padded_to_even(tmp_path):
    video = torch.rand(3, 3, 15, 21) * 2 - 1
    path = write_video(tmp_path / "odd.mp4", video, fps=8, crf=0)
    info = probe_video(path)
    assert (info.height, info.width) == (16, 22)
    decoded, _ = read_video(path)
    # The padding repeats the last row/column.
    assert torch.allclose(decoded[:, :, 15], decoded[:, :, 14], atol=0.1)


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    write_video(tmp_path / "a.mp4", smooth_video(frames=3, height=16, width=16), fps=8)
    write_contact_sheet(tmp_path / "a.png", smooth_video(frames=3, height=16, width=16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "a.png"]
    before = (tmp_path / "a.mp4").read_bytes()

    def fail_halfway(temporary):
        temporary.write_bytes(b"half a video")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(tmp_path / "a.mp4", fail_halfway)
    with pytest.raises(MugenError, match="fps"):
        write_video(tmp_path / "b.mp4", smooth_video(frames=2, height=16, width=16), fps=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "a.png"]
    assert (tmp_path / "a.mp4").read_bytes() == before


@pytest.mark.parametrize("frames,max_frames,label,grid", [(10, 8, None, (2, 4)), (3, 8, "hello", (1, 3)), (16, 4, None, (1, 4))])
def test_contact_sheet_is_a_png_grid(tmp_path, frames, max_frames, label, grid):
    video = frame_numbered_video(frames=frames, size=12)
    path = write_contact_sheet(tmp_path / "sheet.png", video, max_frames=max_frames, label=label)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sheet = cv2.imread(str(path), cv2.IMREAD_COLOR)
    band = 18 if label else 0
    rows, columns = grid
    assert sheet.shape == (band + rows * 12, columns * 12, 3)
    # First and last tiles hold the first and last frames (grey level 10 * index).
    assert sheet[band + 6, 6, 0] == pytest.approx(0, abs=1)
    last_tile = (rows - 1) * 12 + 6 + band, ((min(frames, max_frames) - 1) % columns) * 12 + 6
    assert sheet[last_tile][0] == pytest.approx(10 * (frames - 1), abs=1)


def test_read_image_and_uint8_conversion(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200  # red channel
    cv2.imwrite(str(tmp_path / "red.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    image = read_image(tmp_path / "red.png")
    assert image.shape == (3, 20, 30)
    assert image[0].mean() == pytest.approx(200 / 127.5 - 1, abs=1e-6) and image[1].max() == -1
    assert read_image(tmp_path / "red.png", size=(8, 8)).shape == (3, 8, 8)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(MugenError, match="junk.png.*unreadable"):
        read_image(tmp_path / "junk.png")
    frames = video_to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 4, 1, 1).expand(3, 4, 1, 1))
    assert frames.shape == (4, 1, 1, 3) and frames[:, 0, 0, 0].tolist() == [0, 128, 255, 255]


def test_video_extensions_cover_common_containers():
    assert {".mp4", ".mov", ".mkv", ".webm", ".avi"} <= set(VIDEO_EXTENSIONS)
    assert all(ext.startswith(".") and ext == ext.lower() for ext in VIDEO_EXTENSIONS)
