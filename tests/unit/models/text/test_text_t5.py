"""The T5 encoder on a tiny T5 (d_model 32, 2 layers) and tokenizer the test builds and saves."""

import json
import shutil

import pytest
import torch

from mugen.errors import MugenError
from mugen.models.text import T5TextEncoder, build_text_encoder, clean_caption

WORDS = "a cat dog runs on the beach at sunset red car drives through city night".split()
PROMPTS = ["a cat runs on the beach", "a red car drives through the city at night zebra"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = tmp_path_factory.mktemp("tiny_t5")
    # A Unigram vocabulary: specials, whole words, then single letters so any word tokenizes.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + word, -1.0 - 0.1 * index) for index, word in enumerate(WORDS)]
    vocab += [("\u2581", -4.0)] + [(letter, -5.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(folder)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(t5_dir):
    return build_text_encoder(f"t5:{t5_dir}")


def test_states_match_the_encoder_called_directly(encoder, t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    assert isinstance(encoder, T5TextEncoder)
    assert encoder.dim == 32 and encoder.max_length == 300
    features = encoder.encode(PROMPTS)
    assert features.states.shape == (2, 300, 32) and features.mask.shape == (2, 300)
    assert features.states.dtype == torch.float32  # fp32 on the CPU

    tokenizer = AutoTokenizer.from_pretrained(t5_dir, local_files_only=True)
    tokens = tokenizer(PROMPTS, max_length=300, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(features.mask, tokens["attention_mask"].bool())
    # Each caption's real tokens end with </s>; the rest is padding.
    for row, ids in enumerate(tokens["input_ids"]):
        real = int(features.mask[row].sum())
        assert ids[real - 1] == tokenizer.eos_token_id and torch.all(ids[real:] == tokenizer.pad_token_id)
    assert features.mask[1].sum() > features.mask[0].sum()

    model = T5EncoderModel.from_pretrained(t5_dir, local_files_only=True).eval()
    with torch.no_grad():
        expected = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    torch.testing.assert_close(features.states, expected, atol=1e-6, rtol=1e-5)


def test_sentencepiece_only_folder_loads(t5_dir, tmp_path):
    # DeepFloyd/t5-v1_1-xxl ships spiece.model and tokenizer_config.json, no tokenizer.json.
    import sentencepiece

    folder = tmp_path / "spiece_t5"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(t5_dir / name, folder / name)
    sentences = ["a cat runs on the beach", "a red car drives at night", "the dog sleeps on a sofa"] * 10
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(folder / "spiece"), vocab_size=28,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model")).encode("a cat runs")
    features = T5TextEncoder(folder, max_length=16).encode(["a cat runs"])
    assert features.states.shape == (1, 16, 32)
    assert int(features.mask.sum()) == len(pieces) + 1  # the pieces, then </s>


def test_max_length_truncates_and_pads(t5_dir):
    short_encoder = T5TextEncoder(t5_dir, max_length=8, dtype=torch.bfloat16)
    features = short_encoder.encode(["a cat", " ".join(["dog"] * 20)])
    assert features.states.shape == (2, 8, 32) and features.states.dtype == torch.bfloat16
    assert features.mask[0].tolist() == [True, True, True] + [False] * 5  # a, cat, </s>
    assert features.mask[1].all()


def test_different_prompts_give_different_states(encoder):
    features = encoder.encode(["a cat runs", "a dog runs"])
    assert not torch.allclose(features.states[0, :3], features.states[1, :3])


def test_empty_prompt_is_refused_unless_allowed(encoder):
    with pytest.raises(MugenError, match="prompt 0 is empty"):
        encoder.encode(["\t ", "a cat"])
    null = encoder.encode([""], allow_empty=True)
    assert int(null.mask.sum()) == 1  # only </s>


def test_clean_caption_leaves_text_as_the_reference_does():
    caption = "  A &amp; B <b>bold</b> see https://example.com  -- #tag  "
    assert clean_caption(caption) == caption
    with pytest.raises(MugenError):
        clean_caption(None)


def test_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no_t5_here"
    with pytest.raises(MugenError, match="no_t5_here.*config.json"):
        T5TextEncoder(missing)


@pytest.mark.parametrize(
    "removed, expected",
    [(["config.json"], "lacks config.json"), (["model.safetensors"], "lacks weights"), (["tokenizer.json"], "lacks tokenizer files")],
)
def test_incomplete_directory_says_what_is_missing(t5_dir, tmp_path, removed, expected):
    copy = tmp_path / "t5_copy"
    shutil.copytree(t5_dir, copy)
    for name in removed:
        (copy / name).unlink()
    with pytest.raises(MugenError, match=expected):
        T5TextEncoder(copy)


def test_non_t5_config_is_refused(t5_dir, tmp_path):
    copy = tmp_path / "bert_like"
    shutil.copytree(t5_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "bert"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(MugenError, match="'bert'"):
        T5TextEncoder(copy)
