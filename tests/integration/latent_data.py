"""A tiny encoded dataset on disk, shared by the integration tests."""

from pathlib import Path

import torch

from mugen.data.datasets import save_latent
from mugen.data.manifest import ManifestRow, write_manifest
from mugen.models.text.base import save_text_features


def build_latent_dataset(root: Path, videos: int = 4, images: int = 2, text_dim: int = 32, seed: int = 0) -> Path:
    """Random unit-variance latents with distinct random captions' features (C=24, 4x4 latents)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    (root / "latents").mkdir(parents=True, exist_ok=True)
    (root / "text").mkdir(parents=True, exist_ok=True)
    for index in range(videos + images):
        kind = "video" if index < videos else "image"
        frames = 3 if kind == "video" else 1
        latents = torch.randn(24, frames, 4, 4, generator=g)
        length = 3 + index % 4
        states = torch.randn(length, text_dim, generator=g)
        latent_path = root / "latents" / f"s{index}.safetensors"
        text_path = root / "text" / f"s{index}.safetensors"
        save_latent(latent_path, latents)
        save_text_features(text_path, states, torch.ones(length, dtype=torch.bool))
        rows.append(
            ManifestRow(
                sample_id=f"s{index}", source="synthetic", latent_path=str(latent_path), text_feat_path=str(text_path),
                caption=f"caption {index}", kind=kind, num_frames=1 + 8 * (frames - 1), height=32, width=32,
                latent_frames=frames, latent_height=4, latent_width=4, fps=8.0,
            )
        )
    save_text_features(root / "null_text.safetensors", torch.randn(2, text_dim, generator=g), torch.ones(2, dtype=torch.bool))
    return write_manifest(root / "manifest.parquet", rows)
