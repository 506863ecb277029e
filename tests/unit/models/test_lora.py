"""LoRA adapters on a tiny MUG-DiT: identity at start, merge parity, frozen base, state round trip."""

import copy

import pytest
import torch
from torch import nn

from mugen.errors import MugenError
from mugen.models.dit import MUGDiT, dit_config
from mugen.models.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
)

DEPTH = 2


def random_dit(seed: int = 0) -> MUGDiT:
    """Debug DiT with random non-zero weights everywhere (the real init zeroes the output head)."""
    torch.manual_seed(seed)
    model = MUGDiT(dit_config("debug", depth=DEPTH, text_dim=16))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.1)
    return model.eval()


def dit_inputs(seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(2, 24, 2, 4, 4, generator=generator),  # (B, C, T, H, W)
        "timestep": torch.tensor([250.0, 800.0]),
        "text_states": torch.randn(2, 5, 16, generator=generator),  # (B, L, text_dim)
    }


def randomise_adapters(model: nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def test_fresh_lora_gives_the_same_output_and_random_up_changes_it():
    model = random_dit()
    inputs = dit_inputs()
    with torch.no_grad():
        before = model(**inputs)
    wrapped = apply_lora(model, rank=4, alpha=8.0)
    assert len(wrapped) == DEPTH * len(DEFAULT_TARGETS)
    assert "blocks.0.attn.proj" in wrapped and "blocks.0.cross_attn.proj" in wrapped
    assert not any("y_embedder" in name or "t_block" in name for name in wrapped)
    layer = model.get_submodule("blocks.1.attn.qkv")
    assert isinstance(layer, LoRALinear) and layer.scale == 2.0
    assert layer.lora_down.weight.shape == (4, 96) and layer.lora_up.weight.shape == (288, 4)
    assert bool(layer.lora_down.weight.abs().sum() > 0) and bool((layer.lora_up.weight == 0).all())
    with torch.no_grad():
        fresh = model(**inputs)
    assert torch.equal(fresh, before)

    with torch.no_grad():
        for name in wrapped:
            model.get_submodule(name).lora_up.weight.normal_(std=0.1)
        changed = model(**inputs)
    assert relative_error(changed, before) > 1e-3


def test_merge_matches_unmerged_output_and_restores_plain_linear():
    model = random_dit()
    inputs = dit_inputs()
    wrapped = apply_lora(model, rank=4, alpha=12.0)  # scale 3, so a dropped scale shows
    randomise_adapters(model)
    with torch.no_grad():
        unmerged = model(**inputs)
        reference = random_dit()(**inputs)
    assert relative_error(unmerged, reference) > 1e-3  # the adapters really contribute

    assert merge_lora(model) is model
    for name in wrapped:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear
    assert not any("lora_" in name for name in model.state_dict())
    with torch.no_grad():
        merged = model(**inputs)
    assert relative_error(merged, unmerged) < 1e-5


def test_merge_keeps_the_base_dtype():
    torch.manual_seed(0)
    base = nn.Linear(12, 8).to(torch.bfloat16)
    layer = LoRALinear(base, rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_up.weight.normal_()
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    expected_weight = (base.weight.float() + 2.0 * layer.lora_up.weight.float() @ layer.lora_down.weight.float())
    holder = nn.Sequential(layer)
    merge_lora(holder)
    assert type(holder[0]) is nn.Linear and holder[0].weight.dtype == torch.bfloat16
    assert torch.equal(holder[0].weight, expected_weight.to(torch.bfloat16))
    assert holder[0](x).dtype == torch.bfloat16


def test_only_adapters_train_and_base_weights_stay_bitwise_equal():
    model = random_dit()
    wrapped = apply_lora(model, rank=4)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    expected = {f"{name}.{part}.weight" for name in wrapped for part in ("lora_down", "lora_up")}
    assert trainable == expected
    assert len(trainable_parameters(model)) == len(expected)

    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters_before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-2)
    inputs = dit_inputs()
    target = torch.randn(2, 48, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    model.train()
    for _ in range(3):
        loss = (model(**inputs) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    parameters = dict(model.named_parameters())
    for name, value in frozen_before.items():
        assert parameters[name].grad is None
        assert torch.equal(parameters[name], value), name
    for name, value in adapters_before.items():
        assert not torch.equal(parameters[name], value), name


def test_lora_state_dict_round_trip_into_a_fresh_wrapped_model():
    source = random_dit()
    fresh = copy.deepcopy(source)
    inputs = dit_inputs()
    wrapped = apply_lora(source, rank=3, alpha=6.0)
    randomise_adapters(source)
    state = lora_state_dict(source)
    assert set(state) == {f"{name}.{part}.weight" for name in wrapped for part in ("lora_down", "lora_up")}

    apply_lora(fresh, rank=3, alpha=6.0)
    with torch.no_grad():
        before_load = fresh(**inputs)
        expected = source(**inputs)
    assert not torch.equal(before_load, expected)
    load_lora_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs), expected)


def test_load_lora_state_dict_rejects_mismatched_state():
    source = random_dit()
    apply_lora(source, rank=3)
    state = lora_state_dict(source)
    other_rank = random_dit()
    apply_lora(other_rank, rank=5)
    with pytest.raises(MugenError, match="rank"):
        load_lora_state_dict(other_rank, state)
    fewer_targets = random_dit()
    apply_lora(fewer_targets, targets=("mlp.fc1",), rank=3)
    with pytest.raises(MugenError, match="unexpected"):
        load_lora_state_dict(fewer_targets, state)
    with pytest.raises(MugenError, match="apply_lora"):
        load_lora_state_dict(random_dit(), state)


def test_bad_target_lists_available_linear_names():
    model = random_dit()
    with pytest.raises(MugenError, match=r"match no nn.Linear.*blocks\.N\.attn\.qkv"):
        apply_lora(model, targets=("attn.nonexistent",))
    assert all(parameter.requires_grad for parameter in model.parameters())  # left untouched


@pytest.mark.parametrize("rank", [0, -4])
def test_non_positive_rank_is_a_user_error(rank):
    with pytest.raises(MugenError, match="rank"):
        apply_lora(random_dit(), rank=rank)


def test_applying_twice_is_a_user_error():
    model = random_dit()
    apply_lora(model, targets=("mlp.fc2",), rank=2)
    with pytest.raises(MugenError, match="merge_lora"):
        apply_lora(model, targets=("mlp.fc1",), rank=2)
