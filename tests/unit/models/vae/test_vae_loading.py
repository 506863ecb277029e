"""load_vae: one path selects mugen's VideoVAE (a folder) or the release's VAE (vae.pt), and every
place mugen takes a VAE (encode, train dit --vae, generate) works with a tiny released VAE."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mugen.cli import main
from mugen.errors import MugenError
from mugen.models.vae.frames import decode_clip, encode_clip
from mugen.models.vae.loading import load_vae, resolve_vae_path, vae_kind
from mugen.models.vae.model import VideoVAE
from mugen.models.vae.official import ReleasedVAEConfig, ReleasedVideoVAE, save_released_vae
from mugen.models.vae.presets import vae_config

TINY_RELEASED = ReleasedVAEConfig(
    image_block_channels=(8, 8, 16, 16),
    image_layers_per_block=1,
    image_norm_groups=4,
    temporal_filters=8,
    temporal_channel_multipliers=(1, 1, 2, 2),
    temporal_res_blocks=1,
    temporal_norm_groups=4,
    micro_frame_size=16,
)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[ReleasedVideoVAE, Path]:
    torch.manual_seed(0)
    model = ReleasedVideoVAE(TINY_RELEASED).eval()
    path = tmp_path_factory.mktemp("release") / "vae.pt"
    save_released_vae(model, path)
    return model, path


@pytest.fixture(scope="module")
def mugen_vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("mugen_vae") / "vae"
    VideoVAE(vae_config("tiny")).save_pretrained(directory)
    return directory


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_load_vae_dispatches_on_what_the_path_is(released, mugen_vae_dir, tmp_path):
    model, path = released
    assert vae_kind(mugen_vae_dir) == "mugen" and isinstance(load_vae(mugen_vae_dir), VideoVAE)
    loaded = load_vae(path)
    assert isinstance(loaded, ReleasedVideoVAE) and loaded.config == TINY_RELEASED and same_weights(loaded, model)
    assert loaded.shift.dtype == torch.float32 and not loaded.training
    # a folder holding vae.pt (like MUG-V-inference/) selects the file inside it
    assert resolve_vae_path(path.parent) == ("released", path)
    # the same state dict as one safetensors file
    as_safetensors = tmp_path / "vae.safetensors"
    save_released_vae(model, as_safetensors)
    assert vae_kind(as_safetensors) == "released" and same_weights(load_vae(as_safetensors), model)
    in_bf16 = load_vae(path, dtype=torch.bfloat16)
    assert in_bf16.temporal_vae.quant_conv.conv.weight.dtype == torch.bfloat16


def test_paths_that_are_no_vae_are_named(mugen_vae_dir, tmp_path):
    with pytest.raises(MugenError, match=r"nothing\.pt does not exist; pass a mugen VAE folder"):
        load_vae(tmp_path / "nothing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MugenError, match="holds neither config.json"):
        load_vae(tmp_path / "empty")
    with pytest.raises(MugenError, match=f"pass its folder {mugen_vae_dir}"):
        load_vae(mugen_vae_dir / "model.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MugenError, match="neither the released VAE's names"):
        load_vae(tmp_path / "other.safetensors")
    (tmp_path / "vae.onnx").write_bytes(b"x")
    with pytest.raises(MugenError, match="suffix '.onnx'"):
        load_vae(tmp_path / "vae.onnx")


def test_mugen_frame_layout_with_the_released_vae_is_the_release_encode(released):
    """encode_clip (first frame as an image + 8-frame chunks) equals the release's whole-clip encode,
    and decode_clip gives 1 + 8k frames back, decoding in the release's chunks by default."""
    model, _ = released
    video = torch.rand(2, 3, 17, 16, 24) * 2 - 1
    with torch.no_grad():
        latents = encode_clip(model, video)
        assert latents.shape == (2, 24, 3, 2, 3)
        torch.testing.assert_close(latents, model.encode(video, sample_posterior=False), rtol=1e-5, atol=1e-5)
        frames = decode_clip(model, latents)
        assert frames.shape == video.shape and frames.abs().max() <= 1
        torch.testing.assert_close(frames[:, :, 1:], model.decode(latents[:, :, 1:]).clamp(-1, 1))


def test_encode_samples_takes_a_vae_path(released, tmp_path):
    from mugen.data.encode import EncodeSample, encode_samples
    from mugen.data.datasets import load_latent
    from mugen.models.text.base import build_text_encoder

    model, path = released
    video = torch.rand(3, 9, 16, 16) * 2 - 1
    sample = EncodeSample("clip-000", "memory", video, "a test clip", 8.0)
    encode_samples([sample], str(path), build_text_encoder("minilm"), tmp_path / "out")
    latents = load_latent(tmp_path / "out" / "latents" / "clip-000.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(latents, encode_clip(model, video[None])[0])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from mugen.data.synthetic import ProceduralSpec, render_procedural_clip
    from mugen.data.video_io import write_video

    folder = tmp_path_factory.mktemp("clips")
    for index, (shape, colour, direction) in enumerate([("circle", "red", "left"), ("square", "blue", "up")]):
        spec = ProceduralSpec(shape, colour, direction)
        write_video(folder / f"clip{index}.mp4", render_procedural_clip(spec, 17, 32, 32, seed=index), fps=8)
        (folder / f"clip{index}.txt").write_text(spec.caption())
    return folder


def test_cli_encode_train_and_generate_with_the_released_vae(released, clips, tmp_path, capsys):
    """`mugen encode --vae vae.pt`, `mugen train dit --vae vae.pt`, `mugen generate` (recorded VAE and --vae)."""
    from mugen.data.datasets import load_latent
    from mugen.data.manifest import read_manifest
    from mugen.data.video_io import read_video

    model, path = released
    assert main(["encode", "--input", str(clips), "--vae", str(path), "--output", str(tmp_path / "enc"), "--num-frames", "17", "--size", "32", "--device", "cpu"]) == 0
    rows = read_manifest(tmp_path / "enc" / "manifest.parquet")
    assert len(rows) == 2
    row = next(r for r in rows if r.sample_id.startswith("clip0"))
    video, _ = read_video(clips / "clip0.mp4", num_frames=17, start_frame=0, size=(32, 32))
    with torch.no_grad():
        expected = encode_clip(model, video[None])[0]  # the released VAE made these latents
    torch.testing.assert_close(load_latent(row.latent_path), expected)

    run = tmp_path / "dit"
    assert main(["train", "dit", "--manifest", str(tmp_path / "enc" / "manifest.parquet"), "--vae", str(path), "--steps", "2", "--batch-size", "2", "--output", str(run), "--device", "cpu"]) == 0
    record = json.loads((run / "model_config.json").read_text())
    assert record["vae"] == str(path.resolve())

    out = tmp_path / "t2v.mp4"
    assert main(["generate", "--checkpoint", str(run), "--prompt", "a red circle moving left", "--size", "32", "--num-frames", "17", "--steps", "2", "--output", str(out), "--device", "cpu"]) == 0
    assert out.is_file() and out.with_suffix(".png").is_file()
    image = tmp_path / "still.png"
    from PIL import Image

    Image.fromarray(((video[:, 0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(image)
    out2 = tmp_path / "i2v.mp4"
    assert main(["generate", "--checkpoint", str(run), "--vae", str(path.parent), "--image", str(image), "--size", "32", "--num-frames", "9", "--steps", "2", "--output", str(out2), "--device", "cpu"]) == 0
    assert out2.is_file()
    capsys.readouterr()


def test_train_dit_checks_the_vae_before_training(tmp_path, capsys):
    code = main(["train", "dit", "--manifest", str(tmp_path / "m.parquet"), "--vae", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.pt does not exist" in err and not (tmp_path / "run").exists()
