"""`mugen generate --preset mugv-10b-i2v --weights DIR`: the official release's CLI, end to end.

A release folder is assembled from the parity fixtures: ``dit.pt`` (the reference DiT's state dict,
exported in the official layout), ``vae.pt`` (the reference VAE's, with its reduced sizes beside it)
and ``t5-v1_1-xxl/`` (the tiny T5). The CLI's MP4 must show the video the reference pipeline made
for the same request and seed (up to H.264 coding), and bad input must fail with one clear line.
"""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mugen.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PIPELINE = FIXTURES / "reference_pipeline"
REQUEST = json.loads((PIPELINE / "reference_pipeline.json").read_text(encoding="utf-8"))["request"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    from mugen.models.dit.official import export_official_checkpoint
    from mugen.models.vae.official import ReleasedVAEConfig, ReleasedVideoVAE, save_released_vae

    root = tmp_path_factory.mktemp("release")
    dit_state = {k: v.float() for k, v in load_file(FIXTURES / "reference_dit" / "state_dict.safetensors").items()}
    export_official_checkpoint(dit_state, root / "dit.pt")
    vae_record = json.loads((FIXTURES / "reference_vae" / "reference_vae.json").read_text(encoding="utf-8"))
    vae = ReleasedVideoVAE(ReleasedVAEConfig.from_dict(vae_record["mugen_config"]))
    vae.load_state_dict({k: v.float() for k, v in load_file(FIXTURES / "reference_vae" / "state_dict.safetensors").items()}, strict=True)
    save_released_vae(vae, root / "vae.pt")
    shutil.copytree(PIPELINE / "t5", root / "t5-v1_1-xxl")
    return root


def request_args(release_dir, output, seed=REQUEST["seed"]):
    height, width = REQUEST["frame_size"]
    return [
        "generate", "--preset", "mugv-10b-i2v", "--weights", release_dir, "--image", PIPELINE / REQUEST["image"],
        "--prompt", REQUEST["prompt"], "--size", f"{height}x{width}", "--num-frames", REQUEST["num_frames"],
        "--steps", REQUEST["num_steps"], "--seed", seed, "--device", "cpu", "--output", output,
    ]


def test_release_cli_writes_the_reference_video(release_dir, tmp_path, capsys):
    """The CLI's file against the reference's video written by the same encoder (H.264, crf 17):
    the random tiny VAE's frames are noisy, so the codec alone moves them by ~0.1; the two files must
    decode to (nearly) the same pixels."""
    from mugen.data.video_io import probe_video, read_video, write_video

    reference = load_file(PIPELINE / "reference_pipeline.safetensors")["video_fp32"]  # (3, T, H, W)
    write_video(tmp_path / "reference.mp4", reference, fps=20, crf=17)
    expected, _ = read_video(tmp_path / "reference.mp4")
    out = tmp_path / "release.mp4"
    code, stdout, err = run_cli(request_args(release_dir, out), capsys)
    assert code == 0, err
    assert out.is_file() and out.with_suffix(".png").is_file() and "33 frames" in stdout
    info = probe_video(out)
    assert info.fps == pytest.approx(20.0)  # the reference writes its MP4 at 20 fps
    video, _ = read_video(out)
    assert video.shape == expected.shape
    gap = (video - expected).abs().mean().item()
    assert gap < 2e-3

    other = tmp_path / "other_seed.mp4"
    assert run_cli(request_args(release_dir, other, seed=REQUEST["seed"] + 1), capsys)[0] == 0
    other_video, _ = read_video(other)
    assert (other_video[:, 1:] - expected[:, 1:]).abs().mean().item() > 0.05  # the seed shows


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--aspect-ratio", "16:10"], "aspect ratio '16:10'.*9:16 \\(720x1280\\)"),
        (["--duration", "4"], "duration '4'.*5 \\(105 frames\\), 3 \\(73 frames\\)"),
        (["--checkpoint", "somewhere"], "--checkpoint does not apply"),
        (["--image", None], "give both --image and --prompt"),
    ],
)
def test_release_cli_bad_request_is_one_clear_line(release_dir, tmp_path, capsys, change, expected):
    import re

    args = list(request_args(release_dir, tmp_path / "o.mp4"))
    for flag in ("--size", "--num-frames"):  # use the 720p tables, so --aspect-ratio / --duration are read
        index = args.index(flag)
        del args[index : index + 2]
    flag, value = change
    if flag in args:
        index = args.index(flag)
        del args[index : index + 2]
    if value is not None:
        args += [flag, value]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and re.search(expected, err), err
    assert not (tmp_path / "o.mp4").exists()


def test_release_cli_names_missing_weight_files(release_dir, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(release_dir / "dit.pt", partial / "dit.pt")
    code, _, err = run_cli(request_args(partial, tmp_path / "o.mp4"), capsys)
    assert code == 2 and "vae.pt" in err and "t5-v1_1-xxl" in err and "dit.pt," not in err.split("it must hold")[0]


def test_release_cli_reports_a_truncated_dit(release_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(release_dir, broken)
    data = (broken / "dit.pt").read_bytes()
    (broken / "dit.pt").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(request_args(broken, tmp_path / "o.mp4"), capsys)
    assert code == 2 and "dit.pt" in err and "truncated" in err


def test_release_cli_refuses_a_text_encoder_of_another_width(release_dir, tmp_path, capsys):
    from transformers import T5Config, T5EncoderModel

    mixed = tmp_path / "mixed"
    shutil.copytree(release_dir, mixed)
    config = json.loads((mixed / "t5-v1_1-xxl" / "config.json").read_text())
    config.update(d_model=32, d_kv=8)
    T5EncoderModel(T5Config(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")})).save_pretrained(mixed / "t5-v1_1-xxl")
    code, _, err = run_cli(request_args(mixed, tmp_path / "o.mp4"), capsys)
    assert code == 2 and "expects 64-d text features" in err and "t5-v1_1-xxl gives 32-d" in err
