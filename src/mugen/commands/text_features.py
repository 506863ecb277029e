"""`mugen text-features`: precompute prompt features once, use them anywhere as `precomputed:DIR`.

Useful where the text encoder cannot run (no weights on a GPU node, a T5-XXL too large to keep
beside the DiT): encode the prompts where the encoder lives, then pass
``--text-encoder precomputed:DIR`` to training, encoding or generation. The empty prompt (the null
condition for classifier-free guidance) is always included.
"""

from __future__ import annotations

from pathlib import Path

from mugen.commands.common import add_device, resolve_device
from mugen.errors import MugenError


def register(commands) -> None:
    parser = commands.add_parser("text-features", help="precompute text features for a list of prompts")
    parser.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    parser.add_argument("--output", required=True, help="folder for the features and index.json")
    parser.add_argument("--text-encoder", default="minilm", help="minilm or t5:/local/dir")
    add_device(parser, default="cpu")
    parser.set_defaults(handler=run)


def precompute_text_features(prompts: list[str], encoder, output_dir: str | Path) -> Path:
    """Write one safetensors file per prompt (plus the empty prompt) and index.json; returns the index."""
    from mugen.models.text.base import save_text_features
    from mugen.models.text.precomputed import write_precomputed_index

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    unique = list(dict.fromkeys(["", *prompts]))
    mapping = {}
    for index, prompt in enumerate(unique):
        features = encoder.encode([prompt], allow_empty=True)
        path = output_dir / f"prompt_{index:05d}.safetensors"
        save_text_features(path, features.states[0].float().cpu(), features.mask[0].cpu())
        mapping[prompt] = path.name
    return write_precomputed_index(output_dir, mapping)


def run(args) -> int:
    from mugen.models.text.base import build_text_encoder

    path = Path(args.prompts)
    if not path.is_file():
        raise MugenError(f"--prompts {path} does not exist; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise MugenError(f"--prompts {path} holds no prompts")
    encoder = build_text_encoder(args.text_encoder, device=resolve_device(args.device))
    index = precompute_text_features(prompts, encoder, args.output)
    print(f"wrote features for {len(prompts)} prompts (+ the empty prompt); index {index}")
    return 0
