"""Text encoders behind one interface: prompts -> `TextFeatures` (token states + mask).

`build_text_encoder("minilm" | "t5:/local/dir" | "precomputed:/dir")` picks one; the packaged
MiniLM-L6 is the offline default, T5-XXL is what the official MUG-V release uses.
"""

from mugen.models.text.base import (
    TextEncoder,
    TextFeatures,
    build_text_encoder,
    concat_text_features,
    load_text_features,
    pad_text_features,
    save_text_features,
)
from mugen.models.text.minilm import MiniLMTextEncoder, minilm_model_dir
from mugen.models.text.precomputed import PrecomputedTextEncoder, write_precomputed_index
from mugen.models.text.t5 import T5TextEncoder, clean_caption

__all__ = [
    "MiniLMTextEncoder",
    "PrecomputedTextEncoder",
    "T5TextEncoder",
    "TextEncoder",
    "TextFeatures",
    "build_text_encoder",
    "clean_caption",
    "concat_text_features",
    "load_text_features",
    "minilm_model_dir",
    "pad_text_features",
    "save_text_features",
    "write_precomputed_index",
]
