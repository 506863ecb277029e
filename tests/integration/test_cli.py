"""The `mugen` command end to end on tiny settings, and its answers to bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mugen.cli import main
from mugen.data.synthetic import ProceduralSpec, render_procedural_clip
from mugen.data.video_io import probe_video, write_video


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained_chain(tmp_path_factory):
    """tiny VAE (few steps) -> encode procedural videos from files -> debug DiT (few steps)."""
    root = tmp_path_factory.mktemp("chain")
    clips = root / "clips"
    clips.mkdir()
    for index, (shape, colour, direction) in enumerate([("circle", "red", "left"), ("square", "blue", "up"), ("triangle", "green", "right")]):
        spec = ProceduralSpec(shape, colour, direction)
        write_video(clips / f"clip{index}.mp4", render_procedural_clip(spec, 17, 32, 32, seed=index), fps=8)
        (clips / f"clip{index}.txt").write_text(spec.caption())
    from PIL import Image

    still = render_procedural_clip(ProceduralSpec("square", "yellow", "down"), 1, 32, 32, seed=7)[:, 0]
    Image.fromarray(((still.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(clips / "still.png")
    (clips / "still.txt").write_text("a yellow square on a dark background")
    (clips / "broken.mp4").write_bytes(b"\x00not a video at all" * 50)
    (clips / "broken.txt").write_text("a broken file")
    assert main(["train", "vae", "--data", str(clips), "--num-frames", "8", "--size", "32", "--clips", "4", "--steps", "3", "--batch-size", "2", "--output", str(root / "vae"), "--device", "cpu"]) == 0
    assert main(["encode", "--input", str(clips), "--vae", str(root / "vae" / "vae"), "--output", str(root / "enc"), "--num-frames", "17", "--size", "32", "--device", "cpu"]) == 0
    assert main(["train", "dit", "--manifest", str(root / "enc" / "manifest.parquet"), "--vae", str(root / "vae" / "vae"), "--steps", "3", "--batch-size", "2", "--output", str(root / "dit"), "--device", "cpu"]) == 0
    return root


def test_encode_skips_the_corrupt_video_and_records_why(trained_chain):
    from mugen.data.manifest import read_manifest

    rows = read_manifest(trained_chain / "enc" / "manifest.parquet")
    assert sorted(r.sample_id for r in rows) == ["clip0-000", "clip1-000", "clip2-000", "still"]
    videos = [r for r in rows if r.kind == "video"]
    assert len(videos) == 3 and all(r.latent_frames == 3 and r.latent_height == 4 for r in videos)
    (image,) = [r for r in rows if r.kind == "image"]
    assert image.latent_frames == 1 and image.num_frames == 1  # images and videos train together
    rejections = [json.loads(line) for line in (trained_chain / "enc" / "rejections.jsonl").read_text().splitlines()]
    assert len(rejections) == 1 and "broken.mp4" in rejections[0]["source"]


def test_generate_t2v_and_i2v_write_playable_mp4_and_png(trained_chain, tmp_path, capsys):
    out = tmp_path / "t2v.mp4"
    code, _, err = run_cli(["generate", "--checkpoint", trained_chain / "dit", "--prompt", "a red circle moving left on a dark background", "--size", "32", "--num-frames", "17", "--steps", "3", "--output", out, "--device", "cpu"], capsys)
    assert code == 0, err
    info = probe_video(out)
    assert (info.num_frames, info.height, info.width, info.codec) == (17, 32, 32, "h264")
    assert out.with_suffix(".png").stat().st_size > 0
    image = tmp_path / "first.png"
    from PIL import Image

    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(image)
    out2 = tmp_path / "i2v.mp4"
    code, _, err = run_cli(["generate", "--checkpoint", trained_chain / "dit", "--image", image, "--size", "32", "--num-frames", "9", "--steps", "2", "--output", out2, "--device", "cpu"], capsys)
    assert code == 0, err
    assert probe_video(out2).num_frames == 9


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--prompt", "   "], "--prompt is empty"),
        (["--prompt", "x", "--size", "60"], "not divisible by 16"),
        (["--prompt", "x", "--num-frames", "10"], "1 + 8k"),
        (["--prompt", "x", "--preset", "1B"], "preset"),
        (["--image", "/no/such/image.png"], "/no/such/image.png"),
    ],
)
def test_generate_bad_input_is_one_line_and_leaves_no_file(trained_chain, tmp_path, capsys, extra, expected):
    out = tmp_path / "bad.mp4"
    code, _, err = run_cli(["generate", "--checkpoint", trained_chain / "dit", "--output", out, "--size", "32", "--device", "cpu", *extra], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("mugen")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() and not out.with_suffix(".png").exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_paths_are_named(tmp_path, capsys):
    code, _, err = run_cli(["generate", "--checkpoint", tmp_path / "nope", "--prompt", "x", "--output", tmp_path / "o.mp4"], capsys)
    assert code == 2 and str(tmp_path / "nope") in err
    code, _, err = run_cli(["encode", "--input", tmp_path / "none", "--vae", tmp_path / "v", "--output", tmp_path / "o"], capsys)
    assert code == 2 and str(tmp_path / "none") in err
    code, _, err = run_cli(["train", "dit", "--manifest", tmp_path / "m.parquet", "--output", tmp_path / "run"], capsys)
    assert code == 2 and "m.parquet" in err


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mugen", "generate", "--checkpoint", str(tmp_path / "x"), "--prompt", "p", "--output", str(tmp_path / "o.mp4")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr


@pytest.mark.parametrize("extra,expected", [(["--num-frames", "12"], "1 + 8k"), (["--size", "40"], "divisible by 16")])
def test_encode_bad_settings_write_nothing(trained_chain, tmp_path, capsys, extra, expected):
    out = tmp_path / "enc"
    code, _, err = run_cli(["encode", "--input", trained_chain / "clips", "--vae", trained_chain / "vae" / "vae", "--output", out, "--device", "cpu", *extra], capsys)
    assert code == 2 and expected in err
    assert not out.exists()


def test_encode_with_every_input_rejected_leaves_no_output(trained_chain, tmp_path, capsys):
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "bad.mp4").write_bytes(b"garbage" * 100)
    (clips / "bad.txt").write_text("a caption")
    out = tmp_path / "enc"
    code, _, err = run_cli(["encode", "--input", clips, "--vae", trained_chain / "vae" / "vae", "--output", out, "--device", "cpu"], capsys)
    assert code == 2 and "nothing was encoded" in err
    assert not out.exists()


@pytest.mark.parametrize("config", ["dit_debug.json"])
def test_shipped_training_config_drives_mugen_train(trained_chain, tmp_path, capsys, config):
    shipped = Path(__file__).resolve().parents[2] / "configs" / config
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "dit", "--manifest", trained_chain / "enc" / "manifest.parquet", "--config", shipped, "--steps", "101", "--batch-size", "2", "--output", out, "--device", "cpu"], capsys)
    assert code == 0, err
    record = json.loads((out / "model_config.json").read_text())
    assert record["dit"]["depth"] == 3 and record["shift_base_resolution"] == 4096
    assert (out / "checkpoints" / "step_00000101" / "model.safetensors").is_file()


def test_config_with_an_unknown_key_is_named(trained_chain, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"stepz": 3}}))
    code, _, err = run_cli(["train", "dit", "--manifest", trained_chain / "enc" / "manifest.parquet", "--config", bad, "--output", tmp_path / "r"], capsys)
    assert code == 2 and "stepz" in err
    assert not (tmp_path / "r").exists()


def test_attention_option_sets_the_backend_of_the_run_and_rejects_unknown_ones(capsys):
    from mugen.models.common.attention import get_sdpa_backend, set_sdpa_backend

    before = get_sdpa_backend()
    try:
        code, out, _ = run_cli(["--attention", "MATH", "plan", "--preset", "1B", "--resolution", "360p", "--latent-frames", "10", "--gpu", "h100", "--gpus", "8"], capsys)
        assert code == 0 and out
        assert get_sdpa_backend() == "math"
        plan = ["plan", "--preset", "1B", "--resolution", "360p", "--latent-frames", "10", "--gpu", "h100", "--gpus", "8"]
        code, out, _ = run_cli(["--attention", "fa4", *plan], capsys)  # planned with FlashAttention-4's measured rate
        assert code == 0 and "attention 400 TFLOP/s" in " ".join(out.split())
        code, out, _ = run_cli(["--attention", "cudnn", *plan], capsys)
        assert code == 0 and "attention 330 TFLOP/s" in " ".join(out.split())
        code, _, err = run_cli(["--attention", "fa5", "plan", "--preset", "1B", "--gpus", "8"], capsys)
        assert code == 2 and "SDPA backend 'fa5' is unknown" in err and "fa4" in err
    finally:
        set_sdpa_backend(before)
