"""T5 encoder token states, as the official MUG-V release conditions its DiT.

The release encodes captions with the encoder of DeepFloyd `t5-v1_1-xxl` (T5-XXL layout, d_model
4096) and hands the DiT the full `last_hidden_state` together with the attention mask
(seed §3.2 text condition networks; the DiT masks padded tokens in cross-attention). What the
reference does with a caption, read off `mug_v/encoder/text_encoder/t5.py` of Shopee-MUG/MUG-V:

- no text cleaning at all (it imports `html` and `re` but never uses them): the caption string
  goes to the tokenizer as given; see `clean_caption`;
- it refuses an empty list or a caption that is empty or only whitespace;
- the tokenizer (`AutoTokenizer`, i.e. the T5 SentencePiece tokenizer) runs with
  `add_special_tokens=True` (T5 appends `</s>`), `truncation=True`, `max_length=300` (set by its
  inference pipeline) and `padding="max_length"`, so every caption becomes exactly 300 tokens,
  right-padded with `<pad>`, and the attention mask is returned;
- the encoder runs under no_grad with that attention mask; the output is `last_hidden_state`
  (B, 300, 4096), padded positions included, plus the mask.

Two facts of the reference that live elsewhere in mugen: its inference pipeline runs this T5 in
float32 (the `T5Encoder` dtype default; only the VAE and DiT are cast to bf16), whereas mugen
defaults to bf16 on GPU (pass `dtype=torch.float32` to match it exactly); and its sampler encodes a
fixed negative prompt (not an empty one) as the unconditional half of classifier-free guidance,
after appending " aesthetic score: 6.0." to the user's prompt.

mugen does the same. Weights and tokenizer come only from a local folder the user gives; nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mugen.errors import MugenError
from mugen.models.text.base import TextEncoder, TextFeatures

T5_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
T5_EXPECTED_FILES = (
    "config.json, weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json]) "
    "and a tokenizer (tokenizer.json or spiece.model)"
)


def clean_caption(text: str) -> str:
    """The caption exactly as the reference T5 pipeline feeds it to the tokenizer: unchanged.

    The official MUG-V text encoder applies no cleaning (no lower-casing, no HTML unescaping, no URL
    or whitespace clean-up as PixArt's `clean_caption` does); the SentencePiece tokenizer's own
    normalisation is all that touches the text. Keeping this step explicit marks where a cleaning
    rule would go and keeps features identical to the reference's.
    """
    if not isinstance(text, str):
        raise MugenError(f"caption is a {type(text).__name__}, not text; give each prompt as a string")
    return text


def _check_t5_dir(model_dir: Path) -> None:
    """Raise a MugenError naming what the folder lacks, before transformers sees it."""
    if not model_dir.is_dir():
        raise MugenError(
            f"T5 folder {model_dir} does not exist; give a local folder holding {T5_EXPECTED_FILES} "
            "(e.g. a downloaded copy of DeepFloyd/t5-v1_1-xxl)"
        )
    missing = []
    if not (model_dir / "config.json").is_file():
        missing.append("config.json")
    if not any((model_dir / name).is_file() for name in T5_WEIGHT_FILES):
        missing.append("weights (" + " or ".join(T5_WEIGHT_FILES) + ")")
    if not any((model_dir / name).is_file() for name in T5_TOKENIZER_FILES):
        missing.append("tokenizer files (" + " or ".join(T5_TOKENIZER_FILES) + ")")
    if missing:
        raise MugenError(f"T5 folder {model_dir} lacks {'; '.join(missing)}; it must hold {T5_EXPECTED_FILES}")
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise MugenError(f"T5 folder {model_dir}: config.json is not readable JSON ({error})") from None
    if model_type != "t5":
        raise MugenError(f"T5 folder {model_dir} holds a {model_type!r} model (config.json model_type); give a T5 model folder")


class T5TextEncoder(TextEncoder):
    """Prompts -> T5 encoder states (B, max_length, d_model), padded to `max_length` like the reference."""

    name = "t5"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        max_length: int = 300,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ):
        from transformers import AutoTokenizer, T5EncoderModel

        if max_length < 1:
            raise MugenError(f"T5 max_length {max_length} must be at least 1 token (the release uses 300)")
        model_dir = Path(model_dir).expanduser()
        _check_t5_dir(model_dir)
        self.device = torch.device(device)
        # bf16 on GPU (T5 v1.1 was trained in bf16; fp16 overflows), fp32 on CPU where bf16 is slow.
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as error:
            raise MugenError(f"could not load the T5 encoder from {model_dir}: {error}") from None
        self.model.eval().requires_grad_(False).to(self.device)
        self.max_length = max_length
        self.dim = self.model.config.d_model
        self.dtype = dtype

    def _encode(self, prompts: list[str]) -> TextFeatures:
        tokens = self.tokenizer(
            [clean_caption(prompt) for prompt in prompts],
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        input_ids = tokens["input_ids"].to(self.device)  # (B, max_length)
        attention_mask = tokens["attention_mask"].to(self.device)  # (B, max_length)
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, max_length, d_model)
        return TextFeatures(states=states, mask=attention_mask.bool())

    def to(self, device: torch.device | str) -> T5TextEncoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self
