"""TextFeatures, the padding helpers, feature files and encoder specs (no model needed)."""

import os

import pytest
import torch
from safetensors.torch import save_file

from mugen.errors import MugenError
from mugen.models.text import (
    TextFeatures,
    build_text_encoder,
    concat_text_features,
    load_text_features,
    pad_text_features,
    save_text_features,
)


def sample(length: int, real: int, width: int = 4, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(length, width, generator=generator).to(dtype)
    mask = torch.arange(length) < real
    return states, mask


def test_text_features_mask_becomes_bool_and_to_changes_states_dtype_only():
    states, mask = sample(5, 3)
    features = TextFeatures(states=states[None], mask=mask[None].to(torch.uint8))
    assert features.mask.dtype == torch.bool
    half = features.to(dtype=torch.float16)
    assert half.states.dtype == torch.float16 and half.mask.dtype == torch.bool
    assert torch.equal(half.mask, features.mask)
    assert features.lengths.tolist() == [3]


def test_text_features_rejects_mismatched_mask():
    with pytest.raises(MugenError, match="mask shape"):
        TextFeatures(states=torch.zeros(2, 5, 4), mask=torch.ones(2, 6, dtype=torch.bool))


def test_select_and_trimmed():
    features = pad_text_features([sample(6, 2, seed=1), sample(6, 4, seed=2), sample(6, 3, seed=3)])
    picked = features.select([2, 0])
    assert torch.equal(picked.states, features.states[[2, 0]])
    assert features[1].states.shape == (1, 6, 4)
    trimmed = features.trimmed()
    assert trimmed.states.shape == (3, 4, 4)  # the longest caption has 4 real tokens
    assert torch.equal(trimmed.states, features.states[:, :4])


def test_pad_text_features_right_pads_with_zeros_and_false():
    short, long = sample(2, 2, seed=1), sample(5, 4, seed=2)
    batch = pad_text_features([short, long])
    assert batch.states.shape == (2, 5, 4) and batch.mask.shape == (2, 5)
    assert torch.equal(batch.states[0, :2], short[0])
    assert torch.all(batch.states[0, 2:] == 0)
    assert batch.mask[0].tolist() == [True, True, False, False, False]
    assert torch.equal(batch.states[1], long[0])
    assert batch.mask[1].tolist() == [True, True, True, True, False]


def test_pad_text_features_length_argument():
    items = [sample(3, 3, seed=1), sample(6, 2, seed=2)]
    longer = pad_text_features(items, length=8)
    assert longer.states.shape == (2, 8, 4)
    assert not longer.mask[:, 6:].any()
    cut = pad_text_features(items, length=3)  # item 1's tail is padding, so cutting it is allowed
    assert cut.states.shape == (2, 3, 4)
    assert torch.equal(cut.states[1], items[1][0][:3])
    with pytest.raises(MugenError, match="at least 3"):
        pad_text_features(items, length=2)


def test_pad_text_features_promotes_dtype_and_checks_width():
    batch = pad_text_features([sample(2, 2, dtype=torch.float16), sample(3, 3)])
    assert batch.states.dtype == torch.float32
    with pytest.raises(MugenError, match="width 5"):
        pad_text_features([sample(2, 2), sample(2, 2, width=5)])
    with pytest.raises(MugenError, match="no items"):
        pad_text_features([])


def test_concat_text_features_pads_to_common_length():
    cond = pad_text_features([sample(3, 3, seed=1), sample(3, 2, seed=2)])
    uncond = pad_text_features([sample(7, 5, seed=3)])
    both = concat_text_features(cond, uncond)
    assert both.states.shape == (3, 7, 4)
    assert torch.equal(both.states[:2, :3], cond.states)
    assert torch.equal(both.mask[:2, :3], cond.mask) and not both.mask[:2, 3:].any()
    assert torch.equal(both.states[2], uncond.states[0])


def test_save_and_load_round_trip_trims_padding(tmp_path):
    states, mask = sample(10, 4, dtype=torch.float16)
    path = tmp_path / "features" / "clip0.safetensors"
    save_text_features(path, states, mask)
    loaded_states, loaded_mask = load_text_features(path)
    assert loaded_states.shape == (4, 4) and loaded_states.dtype == torch.float16
    assert torch.equal(loaded_states, states[:4])
    assert loaded_mask.dtype == torch.bool and loaded_mask.all()
    assert os.listdir(path.parent) == ["clip0.safetensors"]  # no temporary file left behind


def test_save_keeps_inner_padding_and_rejects_empty_mask(tmp_path):
    states, _ = sample(6, 6)
    mask = torch.tensor([True, False, True, False, False, False])
    save_text_features(tmp_path / "a.safetensors", states, mask)
    loaded_states, loaded_mask = load_text_features(tmp_path / "a.safetensors")
    assert loaded_mask.tolist() == [True, False, True]
    assert torch.equal(loaded_states, states[:3])
    with pytest.raises(MugenError, match="no real token"):
        save_text_features(tmp_path / "b.safetensors", states, torch.zeros(6, dtype=torch.bool))
    with pytest.raises(MugenError, match="one sample"):
        save_text_features(tmp_path / "c.safetensors", states[None], mask[None])


def test_load_accepts_uint8_mask(tmp_path):
    path = tmp_path / "uint8.safetensors"
    save_file({"states": torch.ones(3, 2), "mask": torch.tensor([1, 1, 0], dtype=torch.uint8)}, path)
    _, mask = load_text_features(path)
    assert mask.tolist() == [True, True, False]


def test_load_reports_missing_corrupt_and_incomplete_files(tmp_path):
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(MugenError, match="nothing.safetensors"):
        load_text_features(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x07not a safetensors file at all")
    with pytest.raises(MugenError, match="corrupt.safetensors"):
        load_text_features(corrupt)
    incomplete = tmp_path / "incomplete.safetensors"
    save_file({"states": torch.ones(3, 2)}, incomplete)
    with pytest.raises(MugenError, match="lacks mask"):
        load_text_features(incomplete)


@pytest.mark.parametrize("spec", ["clip", "t5", "precomputed:", "minilm:/somewhere"])
def test_build_text_encoder_rejects_bad_specs(spec):
    with pytest.raises(MugenError) as error:
        build_text_encoder(spec)
    message = str(error.value)
    assert "\n" not in message
    if spec == "clip" or spec.startswith("minilm"):
        assert '"minilm"' in message and "t5:/" in message and "precomputed:/" in message
    else:
        assert "needs a folder" in message
