"""Manifests: Parquet round trip, relative paths, the official CSV layout, and bad files."""

import csv
import os

import pyarrow.parquet as pq
import pytest
import torch

from mugen.data.datasets import save_latent
from mugen.data.manifest import MANIFEST_COLUMNS, ManifestRow, read_manifest, write_manifest
from mugen.errors import MugenError


def make_row(root, index, kind="video", latent_frames=3):
    return ManifestRow(
        sample_id=f"s{index}", source=f"clip{index}.mp4",
        latent_path=str(root / "latents" / f"s{index}.safetensors"),
        text_feat_path=str(root / "text" / f"s{index}.safetensors"),
        caption=f"caption {index}", kind=kind, num_frames=17 if kind == "video" else 1, height=32, width=48,
        latent_frames=latent_frames, latent_height=4, latent_width=6, fps=8.0 + index,
    )


def test_columns_cover_the_official_layout():
    assert MANIFEST_COLUMNS[:4] == ("sample_id", "source", "latent_path", "text_feat_path")
    assert {"caption", "kind", "latent_frames", "latent_height", "latent_width", "fps"} <= set(MANIFEST_COLUMNS)


def test_parquet_round_trip_with_relative_paths(tmp_path):
    root = tmp_path / "data"
    outside = tmp_path / "elsewhere" / "s9.safetensors"
    rows = [make_row(root, 0), make_row(root, 1, kind="image", latent_frames=1)]
    rows[1].text_feat_path = str(outside)
    path = write_manifest(root / "manifest.parquet", rows)
    assert sorted(os.listdir(root)) == ["manifest.parquet"]  # atomic: no temporary left behind
    stored = pq.read_table(path).to_pylist()
    assert stored[0]["latent_path"] == "latents/s0.safetensors"  # inside the folder: relative
    assert stored[1]["text_feat_path"] == str(outside)  # outside: absolute
    assert read_manifest(path) == rows
    # Moving the whole folder keeps the manifest valid.
    moved = tmp_path / "moved"
    root.rename(moved)
    again = read_manifest(moved / "manifest.parquet")
    assert again[0].latent_path == str(moved / "latents" / "s0.safetensors")
    assert again[1].text_feat_path == str(outside)


def test_official_csv_reads_shapes_from_latent_files(tmp_path):
    save_latent(tmp_path / "lat" / "a.safetensors", torch.zeros(24, 3, 4, 5))
    save_latent(tmp_path / "lat" / "b.safetensors", torch.zeros(24, 1, 2, 2))
    with open(tmp_path / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample_id", "source", "latent_path", "text_feat_path"])
        writer.writerow(["a", "videos/a.mp4", "lat/a.safetensors", "txt/a.pt"])
        writer.writerow(["b", "videos/b.mp4", str(tmp_path / "lat" / "b.safetensors"), "txt/b.pt"])
    rows = read_manifest(tmp_path / "train.csv")
    assert [r.sample_id for r in rows] == ["a", "b"]
    assert rows[0].latent_path == str(tmp_path / "lat" / "a.safetensors")
    assert rows[0].text_feat_path == str(tmp_path / "txt" / "a.pt")
    assert (rows[0].latent_frames, rows[0].latent_height, rows[0].latent_width) == (3, 4, 5)
    assert (rows[0].num_frames, rows[0].height, rows[0].width) == (17, 32, 40)  # 1 + 8k frames, 8x space
    assert (rows[1].latent_frames, rows[1].kind, rows[1].caption) == (1, "video", "")


def test_csv_with_extra_columns_keeps_them(tmp_path):
    save_latent(tmp_path / "a.safetensors", torch.zeros(24, 1, 2, 2))
    (tmp_path / "m.csv").write_text(
        "sample_id,source,latent_path,text_feat_path,kind,caption,fps,latent_frames,latent_height,latent_width\n"
        "a,x.png,a.safetensors,a.txt.safetensors,image,\"a cat, sitting\",0,1,2,2\n"
    )
    (row,) = read_manifest(tmp_path / "m.csv")
    assert (row.kind, row.caption, row.latent_frames, row.fps) == ("image", "a cat, sitting", 1, 0.0)


def test_bad_manifests_are_reported(tmp_path):
    with pytest.raises(MugenError, match="not found"):
        read_manifest(tmp_path / "missing.parquet")
    (tmp_path / "few.csv").write_text("sample_id,latent_path\na,a.safetensors\n")
    with pytest.raises(MugenError, match="lacks the columns source, text_feat_path"):
        read_manifest(tmp_path / "few.csv")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(MugenError, match="junk.parquet.*unreadable"):
        read_manifest(tmp_path / "junk.parquet")
    (tmp_path / "nan.csv").write_text(
        "sample_id,source,latent_path,text_feat_path,fps\na,x,a.safetensors,t,fast\n"
    )
    with pytest.raises(MugenError, match="fps='fast' is not a number"):
        read_manifest(tmp_path / "nan.csv")
    (tmp_path / "noshape.csv").write_text("sample_id,source,latent_path,text_feat_path\na,x,gone.safetensors,t\n")
    with pytest.raises(MugenError, match="gone.safetensors.*not found"):
        read_manifest(tmp_path / "noshape.csv")


def test_bad_rows_are_refused_on_write(tmp_path):
    row = make_row(tmp_path, 0)
    with pytest.raises(MugenError, match="repeats sample_id 's0'"):
        write_manifest(tmp_path / "m.parquet", [row, row])
    with pytest.raises(MugenError, match="kind 'audio'"):
        write_manifest(tmp_path / "m.parquet", [ManifestRow("x", "", "a", "b", kind="audio")])
    with pytest.raises(MugenError, match=r"\.parquet"):
        write_manifest(tmp_path / "m.csv", [row])
    assert not any(tmp_path.iterdir())
