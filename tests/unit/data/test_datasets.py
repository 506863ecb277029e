"""Latent files, the latent + text dataset, shape keys, collate with ragged captions, clip dataset."""

import pytest
import torch
from safetensors.torch import save_file

from mugen.data.datasets import (
    LatentTextDataset,
    VideoClipDataset,
    collate_latent_batch,
    latent_shape,
    load_latent,
    save_latent,
)
from mugen.data.manifest import ManifestRow, write_manifest
from mugen.errors import MugenError

TEXT_DIM = 6


def save_text(path, length, seed):
    generator = torch.Generator().manual_seed(seed)
    save_file({"states": torch.randn(length, TEXT_DIM, generator=generator), "mask": torch.ones(length, dtype=torch.bool)}, str(path))


def load_text(path):
    from safetensors.torch import load_file

    tensors = load_file(path)
    return tensors["states"], tensors["mask"]


@pytest.fixture
def manifest(tmp_path):
    """Three videos (t=3, 4x4), one of another size (t=2, 4x6) and one image; captions of 2..6 tokens."""
    shapes = [("video", 3, 4, 4), ("video", 3, 4, 4), ("video", 2, 4, 6), ("image", 1, 4, 4), ("video", 3, 4, 4)]
    rows = []
    for index, (kind, t, h, w) in enumerate(shapes):
        latent_path, text_path = tmp_path / f"l{index}.safetensors", tmp_path / f"t{index}.safetensors"
        save_latent(latent_path, torch.full((24, t, h, w), float(index)))
        save_text(text_path, length=2 + index, seed=index)
        rows.append(ManifestRow(f"s{index}", "src", str(latent_path), str(text_path), kind=kind, fps=float(8 + index),
                                latent_frames=t, latent_height=h, latent_width=w))
    return write_manifest(tmp_path / "manifest.parquet", rows)


def test_latent_files_round_trip_and_bad_files_are_reported(tmp_path):
    latents = torch.randn(24, 2, 3, 5)
    save_latent(tmp_path / "a.safetensors", latents)
    assert torch.equal(load_latent(tmp_path / "a.safetensors"), latents)
    assert latent_shape(tmp_path / "a.safetensors") == (24, 2, 3, 5)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    torch.save(latents[None], tmp_path / "official.pt")  # the release stores a batch of one
    assert torch.equal(load_latent(tmp_path / "official.pt"), latents)
    assert latent_shape(tmp_path / "official.pt") == (24, 2, 3, 5)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    for name in ("bad.safetensors", "bad.pt"):
        with pytest.raises(MugenError, match=f"{name}' is unreadable or corrupt") as error:
            load_latent(tmp_path / name)
        assert "\n" not in str(error.value)
    save_file({"other": latents}, str(tmp_path / "wrong_key.safetensors"))
    with pytest.raises(MugenError, match="no 'latents' entry"):
        load_latent(tmp_path / "wrong_key.safetensors")
    with pytest.raises(MugenError, match="not found"):
        load_latent(tmp_path / "missing.safetensors")
    with pytest.raises(MugenError, match="expected"):
        save_latent(tmp_path / "flat.safetensors", torch.zeros(24, 4))


def test_dataset_items_and_shape_keys(manifest):
    dataset = LatentTextDataset(manifest, text_loader=load_text)
    assert len(dataset) == 5
    assert dataset.shape_keys() == [("video", 3, 4, 4), ("video", 3, 4, 4), ("video", 2, 4, 6), ("image", 1, 4, 4), ("video", 3, 4, 4)]
    item = dataset[2]
    assert item["latents"].shape == (24, 2, 4, 6) and item["latents"].dtype == torch.float32
    assert float(item["latents"].mean()) == 2.0  # the file written for row 2
    assert item["text_states"].shape == (4, TEXT_DIM) and item["text_mask"].dtype == torch.bool
    assert (item["fps"], item["kind"], item["sample_id"], item["index"]) == (10.0, "video", "s2", 2)


def test_default_text_loader_reads_mugen_text_features(manifest):
    dataset = LatentTextDataset(manifest)  # mugen.models.text.base.load_text_features
    assert dataset[0]["text_states"].shape == (2, TEXT_DIM)


def test_shape_keys_come_from_latent_headers_when_the_manifest_has_none(manifest, tmp_path):
    dataset = LatentTextDataset(manifest, text_loader=load_text)
    rows = dataset.rows
    for row in rows:
        row.latent_frames = row.latent_height = row.latent_width = 0
    assert LatentTextDataset(rows, text_loader=load_text).shape_key(2) == ("video", 2, 4, 6)


def test_stale_manifest_shape_is_reported(manifest):
    dataset = LatentTextDataset(manifest, text_loader=load_text)
    dataset.rows[0].latent_frames = 5
    with pytest.raises(MugenError, match="manifest says"):
        dataset[0]


def test_collate_pads_text_and_refuses_mixed_shapes(manifest):
    dataset = LatentTextDataset(manifest, text_loader=load_text)
    batch = collate_latent_batch([dataset[0], dataset[1], dataset[4]])
    assert batch["latents"].shape == (3, 24, 3, 4, 4)
    assert batch["text_states"].shape == (3, 6, TEXT_DIM)  # longest caption: row 4, 6 tokens
    assert batch["text_mask"].sum(dim=1).tolist() == [2, 3, 6]
    assert not batch["text_mask"][0, 2:].any() and (batch["text_states"][0, 2:] == 0).all()
    assert torch.equal(batch["text_states"][1, :3], dataset[1]["text_states"])
    assert batch["fps"].tolist() == [8.0, 9.0, 12.0] and batch["index"].tolist() == [0, 1, 4]
    assert batch["kinds"] == ["video"] * 3 and batch["sample_ids"] == ["s0", "s1", "s4"]
    with pytest.raises(ValueError, match="shape bucket"):
        collate_latent_batch([dataset[0], dataset[2]])


def test_video_clip_dataset():
    clips = [torch.zeros(3, 8, 16, 16), torch.ones(3, 8, 16, 24)]
    dataset = VideoClipDataset(clips)
    assert len(dataset) == 2 and dataset.shape_keys() == [(8, 16, 16), (8, 16, 24)]
    item = dataset[1]
    assert item["index"] == 1 and item["video"] is clips[1]
    with pytest.raises(MugenError, match=r"clip 0 .*\(3, T, H, W\)"):
        VideoClipDataset([torch.zeros(8, 16, 16)])
