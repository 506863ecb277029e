"""Width expansion of MUG-DiT (seed §4.2.1, eq. 2): outputs preserved, shapes of the bigger preset."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from mugen.commands import expand as expand_command
from mugen.errors import MugenError
from mugen.models.dit import MUGDiT, dit_config
from mugen.models.dit.io import load_dit, write_run_config
from mugen.train.checkpoint import save_checkpoint
from mugen.train.expansion import expand_dit, expand_dit_state_dict, expanded_config

TEXT_DIM = 32


def small_config(**overrides):
    return dit_config("debug", **{"hidden_size": 72 * 2, "num_heads": 2, "depth": 2, "text_dim": TEXT_DIM, **overrides})


def randomised_model(config=None, seed: int = 0) -> MUGDiT:
    """A model whose zero-initialised parts (output head, cross-attn proj, biases) are random too."""
    torch.manual_seed(seed)
    model = MUGDiT(config or small_config()).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def inputs(kind: str, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    data = {
        "latents": torch.randn(batch, 24, 3, 4, 6, generator=generator),  # (B, C, T, H, W)
        "timestep": torch.tensor([250.0, 900.0]),
        "text_states": torch.randn(batch, 5, TEXT_DIM, generator=generator),
        "fps": torch.tensor([24.0, 30.0]),
    }
    if kind in ("i2v", "padded_text"):
        data["text_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    if kind == "i2v":
        data["frame_cond_mask"] = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    return data


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def outputs(model: MUGDiT, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(kind))


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("kind", ["t2v", "i2v", "padded_text"])
def test_exact_expansion_preserves_outputs(factor, kind):
    model = randomised_model()
    expanded = expand_dit(model, factor, perturbation=0.0)
    reference = outputs(model, kind)
    assert reference.abs().max() > 0.1  # the output head is not zero: every path reaches the output
    assert relative_error(outputs(expanded, kind), reference) <= 1e-5


def test_expanded_config_grows_width_and_heads_only():
    config = small_config()
    model = expand_dit(randomised_model(config), 2, perturbation=0.0)
    new = model.config
    assert (new.hidden_size, new.num_heads, new.depth) == (2 * config.hidden_size, 2 * config.num_heads, config.depth)
    assert new.head_dim == config.head_dim == 72
    assert dataclasses.replace(new, hidden_size=config.hidden_size, num_heads=config.num_heads) == config
    assert model.num_parameters > 3 * randomised_model(config).num_parameters  # roughly 4x for e = 2


def test_2b_expands_to_the_10b_preset_shapes_on_meta():
    assert expanded_config(dit_config("2B"), 2) == dit_config("10B")
    with torch.device("meta"):
        small = MUGDiT(dit_config("2B"))
        large = MUGDiT(dit_config("10B"))
    state, config = expand_dit_state_dict(small.state_dict(), small.config, 2)
    assert config == dit_config("10B")
    expected = large.state_dict()
    assert state.keys() == expected.keys()
    assert {name: tuple(t.shape) for name, t in state.items()} == {name: tuple(t.shape) for name, t in expected.items()}


def test_heads_are_copies_in_attention_order():
    model = randomised_model()
    d = model.config.hidden_size
    expanded = expand_dit(model, 2, perturbation=0.0)
    qkv = model.blocks[0].attn.qkv.weight  # (3d, d)
    new_qkv = expanded.blocks[0].attn.qkv.weight.view(3, 2, d, 2 * d)  # ([q, k, v], copy, d, 2d)
    for part in range(3):
        for copy in range(2):
            # new heads [copy * h, (copy + 1) * h) repeat the old heads; input halves share W / 2
            assert torch.equal(new_qkv[part, copy, :, :d] * 2, qkv[part * d : (part + 1) * d])
            assert torch.equal(new_qkv[part, copy, :, d:] * 2, qkv[part * d : (part + 1) * d])


def test_default_perturbation_breaks_symmetry_with_small_error():
    model = randomised_model()
    d = model.config.hidden_size
    expanded = expand_dit(model, 2, generator=torch.Generator().manual_seed(0))
    error = relative_error(outputs(expanded, "i2v"), outputs(model, "i2v"))
    assert 1e-7 < error < 1e-2
    qkv = expanded.blocks[0].attn.qkv.weight.view(3, 2, d, 2 * d)
    assert not torch.equal(qkv[0, 0], qkv[0, 1])  # the two copies of q now differ
    fc1 = expanded.blocks[1].mlp.fc1.weight
    assert not torch.equal(fc1[:, :d], fc1[:, d:])  # input halves differ: gradients no longer duplicate
    again = expand_dit(model, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.blocks[0].attn.qkv.weight, expanded.blocks[0].attn.qkv.weight)  # seeded


@pytest.mark.parametrize("factor", [1, 0, 2.0, True, "2"])
def test_bad_factor_is_refused(factor):
    with pytest.raises(MugenError, match="factor"):
        expanded_config(small_config(), factor)


def test_inconsistent_config_or_state_is_refused():
    with pytest.raises(MugenError, match="mlp_ratio"):
        expanded_config(small_config(mlp_ratio=4.005), 2)  # int(144 * 4.005) = 576, int(288 * 4.005) = 1153
    with pytest.raises(MugenError, match="num_heads"):
        expanded_config(dataclasses.replace(small_config(), num_heads=5), 2)
    model = randomised_model()
    state = model.state_dict()
    with pytest.raises(MugenError, match="shape"):
        expand_dit_state_dict(state, small_config(text_dim=16), 2)
    del state["start_token"]
    with pytest.raises(MugenError, match="missing"):
        expand_dit_state_dict(state, model.config, 2)
    with pytest.raises(MugenError, match="perturbation"):
        expand_dit(model, 2, perturbation=-1.0)


def run_expand(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    expand_command.register(commands)
    args = parser.parse_args(["expand", *argv])
    return args.handler(args)


def test_mugen_expand_end_to_end(tmp_path, capsys):
    model = randomised_model()
    run_dir = tmp_path / "run"
    write_run_config(run_dir, {"dit": model.config.to_dict(), "preset": "debug", "text_encoder": "minilm"})
    save_checkpoint(run_dir, 1, model, {"step": 1})
    output = tmp_path / "expanded"
    assert run_expand(["--checkpoint", str(run_dir), "--factor", "2", "--output", str(output), "--perturbation", "0"]) == 0
    assert "wrote" in capsys.readouterr().out

    expanded, record = load_dit(output)
    assert expanded.config == expanded_config(model.config, 2)
    assert record["expanded_from"]["factor"] == 2 and record["expanded_from"]["preset"] == "debug"
    assert record["preset"] is None and record["text_encoder"] == "minilm"
    for kind in ("t2v", "i2v"):
        assert relative_error(outputs(expanded, kind), outputs(model, kind)) <= 1e-5

    with pytest.raises(MugenError, match="already holds"):
        run_expand(["--checkpoint", str(run_dir), "--factor", "2", "--output", str(output)])
    with pytest.raises(MugenError, match="factor"):
        run_expand(["--checkpoint", str(run_dir), "--factor", "1", "--output", str(tmp_path / "other")])
