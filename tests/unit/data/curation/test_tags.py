"""Tags from captions (seed §2.1): KeyBERT over the packaged MiniLM, a local-LLM extractor, the ontology."""

import pytest

from mugen.data.curation.tags import (
    TAG_KINDS,
    KeyBertTagExtractor,
    LLMTagExtractor,
    caption_sections,
    make_tag_extractor,
    parse_llm_tags,
    tag_ontology,
    tag_rows,
)
from mugen.errors import MugenError

STRUCTURED = (
    "Objects: a young woman in a red dress.\nAppearance: long dark hair.\n"
    "Motion: she dances and spins slowly.\nBackground: a wooden stage with warm lights.\nCamera: static."
)


@pytest.fixture(scope="module")
def extractor():
    return KeyBertTagExtractor()


def test_caption_sections_split_the_structured_layout():
    sections = caption_sections(STRUCTURED)
    assert sections["objects"] == "a young woman in a red dress."
    assert sections["motion"] == "she dances and spins slowly."
    assert sections["background"] == "a wooden stage with warm lights."
    assert caption_sections("A dog runs on a beach.") == {}


def test_structured_caption_sections_give_the_kinds(extractor):
    (tags,) = extractor([STRUCTURED])
    assert set(tags) == set(TAG_KINDS)
    assert "woman" in tags["subjects"] or "dress" in tags["subjects"]
    assert {"dances", "spins"} & set(tags["actions"])
    assert "stage" in tags["scenes"]
    # sections keep their words apart: nothing from the background lands in subjects
    assert not {"stage", "wooden", "lights"} & set(tags["subjects"])


def test_free_text_keyphrases_are_sorted_by_nearest_anchor(extractor):
    assert extractor.classify(["dog", "beach", "swimming"]) == ["subjects", "scenes", "actions"]
    (tags, empty) = extractor(["A brown dog on a sandy beach.", ""])
    assert "dog" in tags["subjects"]
    assert "beach" in tags["scenes"]
    assert empty == {kind: [] for kind in TAG_KINDS}
    assert all(tag == tag.lower().strip() for kind in TAG_KINDS for tag in tags[kind])


def test_tag_rows_fill_the_manifest_and_ontology_counts_kept_clips(extractor):
    rows = [
        {"caption": "A dog runs on a beach.", "keep": True},
        {"caption": "A dog sleeps in a kitchen.", "keep": True},
        {"caption": "A dog jumps in a park.", "keep": False},
        {"caption": "", "keep": True},
    ]
    assert tag_rows(rows, extractor) == 3
    assert "dog" in rows[0]["tag_subjects"] and "dog" in rows[1]["tag_subjects"]
    assert "tag_subjects" not in rows[3]
    ontology = tag_ontology(rows)
    assert ontology["subjects"]["dog"] == 2  # the dropped clip is not counted
    assert list(ontology["subjects"])[0] == "dog"  # most frequent first


def test_parse_llm_tags():
    answer = 'Sure! {"subjects": ["Dog ", "dog", "ball"], "actions": "running", "scenes": []} trailing {"x": 1}'
    assert parse_llm_tags(answer) == {"subjects": ["dog", "ball"], "actions": ["running"], "scenes": []}
    assert parse_llm_tags("no json here") is None
    assert parse_llm_tags('{"subjects": [broken') is None
    assert parse_llm_tags('[1, 2] {"scenes": ["park"]}') == {"subjects": [], "actions": [], "scenes": ["park"]}


def test_llm_extractor_runs_a_local_causal_lm(tmp_path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = ["<pad>", "<eos>", "[UNK]", "{", "}", '"subjects":', "[", "]", "dog", "a", "caption:", "json:"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<pad>", eos_token="<eos>").save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    extractor = make_tag_extractor("llm", model_dir=str(tmp_path), max_new_tokens=4)
    assert isinstance(extractor, LLMTagExtractor)
    results = extractor(["a dog", ""])
    assert len(results) == 2
    for tags in results:
        assert set(tags) == set(TAG_KINDS) and all(isinstance(tags[kind], list) for kind in TAG_KINDS)
    # a random model writes no valid JSON: counted, and the caption gets empty tags
    assert extractor.unparsed == 1 and results[0] == {kind: [] for kind in TAG_KINDS}


def test_unknown_extractor_and_missing_model_are_user_errors(tmp_path):
    with pytest.raises(MugenError, match="unknown"):
        make_tag_extractor("spacy")
    with pytest.raises(MugenError, match="config.json"):
        make_tag_extractor("llm", model_dir=str(tmp_path))
