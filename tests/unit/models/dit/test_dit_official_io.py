"""Export/import of MUG-DiT weights in the official layouts (dit.pt, safetensors) and `mugen convert`."""

import argparse

import pytest
import torch
from safetensors.torch import load_file

from mugen.commands import convert
from mugen.errors import MugenError
from mugen.models.dit import MUGDiT, dit_config
from mugen.models.dit.io import write_run_config
from mugen.models.dit.official import (
    build_from_official_checkpoint,
    check_state_dict_fits,
    export_official_checkpoint,
    export_safetensors,
    infer_dit_config,
    load_official_checkpoint,
    matching_preset,
)

TEXT_DIM = 32


def tiny_config(**overrides):
    return dit_config("debug", text_dim=TEXT_DIM, **overrides)


def random_model(seed: int, **overrides) -> MUGDiT:
    """Every parameter random (the zero-initialised head and cross-attention output would hide errors)."""
    torch.manual_seed(seed)
    model = MUGDiT(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def forward(model: MUGDiT) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return model(
            latents=torch.randn(2, 24, 2, 4, 4, generator=generator),
            timestep=torch.tensor([700.0, 30.0]),
            text_states=torch.randn(2, 5, TEXT_DIM, generator=generator),
            text_mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]),
            frame_cond_mask=torch.tensor([[True, False], [False, False]]),
        )


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("filename", ["dit.pt", "dit.safetensors"])
def test_round_trip_is_lossless(tmp_path, filename):
    source = random_model(seed=0)
    export = export_official_checkpoint if filename.endswith(".pt") else export_safetensors
    path = export(source, tmp_path / filename)
    target = random_model(seed=1)
    assert not torch.equal(forward(target), forward(source))  # different weights before loading
    assert load_official_checkpoint(path, target) is target
    assert_bitwise_equal(target.state_dict(), source.state_dict())
    assert torch.equal(forward(target), forward(source))
    assert [p.name for p in tmp_path.iterdir()] == [filename]  # no temporary left behind


def test_official_file_is_a_plain_state_dict_with_the_model_names_shapes_and_dtypes(tmp_path):
    """What the official loader does: torch.load(weights_only=True), then load_state_dict(strict=True)."""
    model = random_model(seed=0)
    path = export_official_checkpoint(model, tmp_path / "dit.pt")
    loaded = torch.load(path, weights_only=True)
    assert type(loaded) is dict and list(loaded) == list(model.state_dict())  # same order too
    assert_bitwise_equal(loaded, model.state_dict())
    assert_bitwise_equal(load_file(export_safetensors(model, tmp_path / "dit.safetensors")), model.state_dict())


def test_export_casts_floating_weights_on_request(tmp_path):
    model = random_model(seed=0)
    path = export_official_checkpoint(model.state_dict(), tmp_path / "dit.pt", dtype=torch.bfloat16)
    loaded = torch.load(path, weights_only=True)
    assert all(tensor.dtype == torch.bfloat16 for tensor in loaded.values())
    torch.testing.assert_close(loaded["t_block.1.weight"].float(), model.t_block[1].weight, rtol=1e-2, atol=1e-3)


def test_views_are_saved_without_their_base_storage(tmp_path):
    base = torch.randn(1000)
    path = export_official_checkpoint({"a": base[:10], "b": base[10:20]}, tmp_path / "views.pt")
    assert path.stat().st_size < 1000 * 4  # the 4 kB base storage was not written
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["a"], base[:10]) and torch.equal(loaded["b"], base[10:20])


def test_build_from_file_infers_the_size(tmp_path):
    source = random_model(seed=0)
    path = export_safetensors(source, tmp_path / "dit.safetensors")
    built = build_from_official_checkpoint(path)
    assert built.config == source.config
    assert torch.equal(forward(built), forward(source))
    with pytest.raises(MugenError, match="unknown MUGDiTConfig fields"):
        build_from_official_checkpoint(path, hidden=3)


@pytest.mark.parametrize("filename", ["dit.pt", "dit.safetensors"])
def test_truncated_file_is_a_clear_error(tmp_path, filename):
    model = random_model(seed=0)
    export = export_official_checkpoint if filename.endswith(".pt") else export_safetensors
    path = export(model, tmp_path / filename)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MugenError, match=rf"{filename}.*truncated or damaged"):
        load_official_checkpoint(path, random_model(seed=1))


def test_missing_file_and_unknown_suffix_are_clear_errors(tmp_path):
    with pytest.raises(MugenError, match=r"nowhere\.pt does not exist"):
        load_official_checkpoint(tmp_path / "nowhere.pt", random_model(seed=0))
    (tmp_path / "dit.ckpt").write_bytes(b"x")
    with pytest.raises(MugenError, match=r"dit\.ckpt has suffix"):
        load_official_checkpoint(tmp_path / "dit.ckpt", random_model(seed=0))


def test_wrapped_state_dict_is_refused(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"model": random_model(seed=0).state_dict(), "step": 3}, path)
    with pytest.raises(MugenError, match=r"wrapped\.pt is not a plain"):
        load_official_checkpoint(path, random_model(seed=0))


def test_wrong_size_names_the_file_the_keys_and_the_preset_it_looks_like(tmp_path):
    path = export_official_checkpoint(random_model(seed=0), tmp_path / "dit.pt")
    narrow = random_model(seed=1, hidden_size=48, num_heads=2)
    before = {name: tensor.clone() for name, tensor in narrow.state_dict().items()}
    with pytest.raises(MugenError) as error:
        load_official_checkpoint(path, narrow)
    message = str(error.value)
    assert "dit.pt does not fit the model" in message
    assert "start_token file (96,) vs model (48,)" in message
    assert "looks like preset 'debug' (hidden 96, depth 3, 4 heads, text width 32)" in message
    assert "the model is no preset (hidden 48, depth 3, 2 heads" in message
    assert_bitwise_equal(narrow.state_dict(), before)  # nothing was half-loaded
    with pytest.raises(MugenError, match=r"missing \(blocks\.3\."):
        load_official_checkpoint(path, random_model(seed=1, depth=4))


@pytest.mark.parametrize("preset,hidden,heads", [("10B", 3456, 48), ("2B", 1728, 24)])
def test_size_inference_on_meta_paper_state_dicts(preset, hidden, heads):
    with torch.device("meta"):
        model = MUGDiT(dit_config(preset))
    config = infer_dit_config(model.state_dict())
    assert (config.hidden_size, config.depth, config.num_heads, config.text_dim) == (hidden, 56, heads, 4096)
    assert config.mlp_ratio == 4.0 and config.patch_size == (1, 2, 2) and config.latent_channels == 24
    assert matching_preset(config) == preset


def test_2b_state_dict_for_a_10b_model_says_it_looks_like_2b():
    with torch.device("meta"):
        small, large = MUGDiT(dit_config("2B")), MUGDiT(dit_config("10B"))
    with pytest.raises(MugenError, match=r"x_embedder\.proj\.weight file \(1728, 24, 1, 2, 2\) vs model \(3456.*preset '2B'"):
        check_state_dict_fits(small.state_dict(), large, "dit.pt")


def test_meta_model_cannot_be_exported_and_leaves_no_file(tmp_path):
    with torch.device("meta"):
        model = MUGDiT(tiny_config())
    with pytest.raises(MugenError, match="meta device"):
        export_safetensors(model, tmp_path / "dit.safetensors")
    assert list(tmp_path.iterdir()) == []


def convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mugen")
    convert.register(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.parametrize("fmt,filename", [("official", "dit.pt"), ("safetensors", "dit.safetensors")])
def test_convert_command_exports_a_run(tmp_path, fmt, filename, capsys):
    model = random_model(seed=0)
    run_dir = tmp_path / "run"
    write_run_config(run_dir, {"dit": model.config.to_dict(), "preset": "debug"})
    export_safetensors(model, run_dir / "model.safetensors")  # an exported run folder
    output = tmp_path / "out" / filename
    args = convert_parser().parse_args(["convert", "--checkpoint", str(run_dir), "--to", fmt, "--output", str(output)])
    assert args.handler(args) == 0
    assert str(output) in capsys.readouterr().out
    restored = load_official_checkpoint(output, random_model(seed=1))
    assert_bitwise_equal(restored.state_dict(), model.state_dict())


def test_convert_command_rejects_a_wrong_suffix_and_a_missing_run(tmp_path):
    parser = convert_parser()
    args = parser.parse_args(["convert", "--checkpoint", str(tmp_path), "--to", "official", "--output", str(tmp_path / "dit.safetensors")])
    with pytest.raises(MugenError, match=r"must end in \.pt or \.pth for --to official"):
        convert.run(args)
    args = parser.parse_args(["convert", "--checkpoint", str(tmp_path / "none"), "--to", "safetensors", "--output", str(tmp_path / "dit.safetensors")])
    with pytest.raises(MugenError, match="does not exist"):
        convert.run(args)
