"""Precomputed features read back by prompt through index.json."""

import json

import pytest
import torch

from mugen.errors import MugenError
from mugen.models.text import (
    PrecomputedTextEncoder,
    build_text_encoder,
    load_text_features,
    save_text_features,
    write_precomputed_index,
)

WIDTH = 6
CAPTIONS = {"a cat": 3, "a dog runs on the beach": 7, "": 1}  # prompt -> real tokens


@pytest.fixture
def feature_dir(tmp_path):
    generator = torch.Generator().manual_seed(0)
    mapping = {}
    for number, (prompt, length) in enumerate(CAPTIONS.items()):
        states = torch.randn(length + 4, WIDTH, generator=generator)  # 4 padded positions, trimmed on save
        mask = torch.arange(length + 4) < length
        relative = f"text/{number:03d}.safetensors"
        save_text_features(tmp_path / relative, states, mask)
        mapping[prompt] = relative
    write_precomputed_index(tmp_path, mapping)
    return tmp_path


def test_encode_returns_stored_features_padded_in_prompt_order(feature_dir):
    encoder = build_text_encoder(f"precomputed:{feature_dir}")
    assert isinstance(encoder, PrecomputedTextEncoder)
    assert encoder.dim == WIDTH and encoder.max_length == 7
    features = encoder.encode(["a dog runs on the beach", "a cat"])
    assert features.states.shape == (2, 7, WIDTH)
    assert features.mask.sum(1).tolist() == [7, 3]
    cat_states, _ = load_text_features(feature_dir / encoder.index["a cat"])
    assert torch.equal(features.states[1, :3], cat_states)
    assert torch.all(features.states[1, 3:] == 0)


def test_dtype_and_device_apply_to_the_output(feature_dir):
    encoder = build_text_encoder(f"precomputed:{feature_dir}", device="cpu", dtype=torch.float16)
    assert encoder.encode(["a cat"]).states.dtype == torch.float16


def test_unknown_and_empty_prompts(feature_dir):
    encoder = PrecomputedTextEncoder(feature_dir)
    with pytest.raises(MugenError, match="'a horse'.*mugen encode"):
        encoder.encode(["a horse"])
    with pytest.raises(MugenError, match="prompt 0 is empty"):
        encoder.encode([""])
    null = encoder.encode([""], allow_empty=True)  # the stored null condition
    assert null.states.shape == (1, 1, WIDTH)


def test_missing_or_broken_index(tmp_path, feature_dir):
    with pytest.raises(MugenError, match="has no index.json"):
        PrecomputedTextEncoder(tmp_path / "elsewhere")
    (feature_dir / "index.json").write_text("{not json")
    with pytest.raises(MugenError, match="not readable JSON"):
        PrecomputedTextEncoder(feature_dir)


def test_index_entry_pointing_to_a_removed_file(feature_dir):
    encoder = PrecomputedTextEncoder(feature_dir)
    (feature_dir / encoder.index["a cat"]).unlink()
    with pytest.raises(MugenError, match="does not exist"):
        encoder.encode(["a cat"])


def test_write_index_stores_relative_paths_and_checks_files(tmp_path):
    save_text_features(tmp_path / "x" / "one.safetensors", torch.ones(2, WIDTH), torch.ones(2, dtype=torch.bool))
    index_path = write_precomputed_index(tmp_path, {"one": tmp_path.resolve() / "x" / "one.safetensors"})
    assert json.loads(index_path.read_text()) == {"one": "x/one.safetensors"}
    with pytest.raises(MugenError, match="does not exist"):
        write_precomputed_index(tmp_path, {"two": "x/two.safetensors"})
    with pytest.raises(MugenError, match="outside"):
        write_precomputed_index(tmp_path / "x", {"one": tmp_path.resolve() / "elsewhere.safetensors"})
