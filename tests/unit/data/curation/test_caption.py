"""Captioning (seed §2.1): a tiny random Qwen2-VL through the real code path, and sidecars."""

import json

import numpy as np
import pytest

from _c2_tiny_vlm import build_tiny_qwen2vl
from _c2_videos import write_scrolling_video
from mugen.data.curation.caption import (
    CaptionConfig,
    QwenVLCaptioner,
    caption_frame_indices,
    caption_rows,
    load_caption_mapping,
    sidecar_caption,
)
from mugen.errors import MugenError


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"))


@pytest.fixture(scope="module")
def captioner(tiny_vlm_dir):
    return QwenVLCaptioner(tiny_vlm_dir, CaptionConfig(frames_per_clip=2, frame_short_side=56, batch_size=2, max_new_tokens=5, device="cpu"))


def _row(video, clip_id="v-0000", start=0, end=30, **extra):
    row = {"clip_id": clip_id, "video_id": "v", "source_path": str(video), "start_frame": start, "end_frame": end,
           "num_frames": end - start, "fps": 25.0, "width": 160, "height": 96, "rotation": 0, "clip_path": "", "passed_filters": True}
    row.update(extra)
    return row


def test_caption_frame_indices_are_centred_and_bounded():
    assert caption_frame_indices(40, 4) == [5, 15, 25, 35]
    assert caption_frame_indices(3, 8) == [0, 1, 2]


def test_processor_expands_one_image_token_per_merged_patch(captioner):
    processor = captioner.processor
    frames = [[np.zeros((56, 84, 3), np.uint8)] * 2, [np.zeros((56, 56, 3), np.uint8)] * 3]
    text = [captioner._chat(len(clip)) for clip in frames]
    inputs = processor(text=text, images=frames, padding=True, return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = inputs["image_grid_thw"]  # (5 images, 3)
    assert grid.shape == (5, 3)
    expected = (grid.prod(-1) // 4).tolist()  # merge 2x2
    per_clip = [sum(expected[:2]), sum(expected[2:])]
    assert (inputs["input_ids"] == image_id).sum(-1).tolist() == per_clip
    assert (inputs["mm_token_type_ids"] == 1).sum().item() == sum(per_clip)
    assert inputs["pixel_values"].shape[0] == int(grid.prod(-1).sum())


def test_vlm_generates_one_caption_per_clip_in_batches(captioner, monkeypatch):
    calls = []
    generate = captioner.model.generate

    def counting_generate(**inputs):
        calls.append(inputs["input_ids"].shape[0])
        return generate(**inputs)

    monkeypatch.setattr(captioner.model, "generate", counting_generate)
    rng = np.random.default_rng(0)
    clips = [[rng.integers(0, 255, (48, 80, 3), dtype=np.uint8) for _ in range(2)] for _ in range(3)]
    captions = captioner(clips)
    assert calls == [2, 1]  # batch_size 2
    assert len(captions) == 3 and all(isinstance(text, str) for text in captions)
    assert all("<|" not in text for text in captions)  # special tokens stripped


def test_caption_rows_uses_vlm_and_caches_per_video(captioner, tmp_path):
    video = write_scrolling_video(tmp_path / "v.mp4", num_frames=30)
    rows = [_row(video, "v-0000", 0, 15), _row(video, "v-0001", 15, 30), _row(video, "v-0002", 0, 30, passed_filters=False)]
    counts = caption_rows(rows, tmp_path, captioner=captioner, cache_dir=tmp_path / "cache")
    assert counts["vlm"] == 2 and counts["failed"] == 0
    assert [row.get("caption_source") for row in rows] == ["vlm", "vlm", None]
    cached = json.loads((tmp_path / "cache" / "v.json").read_text())
    assert set(cached) == {"v-0000", "v-0001"}
    again = [_row(video, "v-0000", 0, 15), _row(video, "v-0001", 15, 30)]
    counts = caption_rows(again, tmp_path, captioner=captioner, cache_dir=tmp_path / "cache")
    assert counts["cached"] == 2 and counts["vlm"] == 0
    assert [row["caption"] for row in again] == [cached["v-0000"], cached["v-0001"]]


def test_sidecars_text_file_csv_and_jsonl(tmp_path):
    video = tmp_path / "walk.mp4"
    video.write_bytes(b"")
    row = _row(video, "walk-1234-0001")
    assert sidecar_caption(row, None) is None
    (tmp_path / "walk.txt").write_text("A man walks.\n")
    assert sidecar_caption(row, None) == "A man walks."
    table = tmp_path / "captions.csv"
    table.write_text('clip_id,caption\nwalk-1234-0001,"A man walks, fast."\n')
    assert sidecar_caption(row, load_caption_mapping(table)) == "A man walks, fast."
    lines = tmp_path / "captions.jsonl"
    lines.write_text(json.dumps({"video": "walk.mp4", "caption": "By file name."}) + "\n")
    assert sidecar_caption(row, load_caption_mapping(lines)) == "By file name."
    rows = [row, _row(tmp_path / "other.mp4", "other-0000")]
    counts = caption_rows(rows, tmp_path, mapping=load_caption_mapping(lines))
    assert counts == {"sidecar": 1, "vlm": 0, "cached": 0, "uncaptioned": 1, "failed": 0}
    assert rows[0]["caption_source"] == "sidecar" and not rows[1].get("caption")


def test_bad_sidecars_and_model_folders_are_user_errors(tmp_path):
    with pytest.raises(MugenError, match="does not exist"):
        load_caption_mapping(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,text\na,b\n")
    with pytest.raises(MugenError, match="caption"):
        load_caption_mapping(bad)
    (tmp_path / "x.yaml").write_text("a: b")
    with pytest.raises(MugenError, match="csv or .jsonl"):
        load_caption_mapping(tmp_path / "x.yaml")
    with pytest.raises(MugenError, match="config.json"):
        QwenVLCaptioner(tmp_path)


def test_clip_frames_are_upright_and_shrunk(tmp_path):
    from mugen.data.curation.caption import clip_frames

    video = write_scrolling_video(tmp_path / "v.mp4", num_frames=30, size=(160, 96))
    config = CaptionConfig(frames_per_clip=3, frame_short_side=48)
    frames = clip_frames(_row(video, start=0, end=30), tmp_path, config)
    assert [frame.shape for frame in frames] == [(48, 80, 3)] * 3
    turned = clip_frames(_row(video, start=0, end=30, rotation=90), tmp_path, config)
    assert [frame.shape for frame in turned] == [(80, 48, 3)] * 3
    assert np.array_equal(turned[0], np.rot90(frames[0]))
    # a written clip is read from its own file, from its frame 0
    written = clip_frames(_row(video, start=100, end=130, clip_path="v.mp4"), tmp_path, config)
    assert all(np.array_equal(a, b) for a, b in zip(written, frames))


def test_caption_stage_of_a_manifest_through_the_cli(tiny_vlm_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    from mugen.cli import main

    write_scrolling_video(tmp_path / "in" / "a.mp4", num_frames=30)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"caption": {"frames_per_clip": 2, "frame_short_side": 56, "max_new_tokens": 4, "device": "cpu"}}))
    output = tmp_path / "out"
    assert main(["curate", "--input", str(tmp_path / "in"), "--output", str(output), "--stages", "probe", "--config", str(config)]) == 0
    assert main(["curate", "caption", "--manifest", str(output / "manifest.parquet"), "--vlm", str(tiny_vlm_dir), "--config", str(config)]) == 0
    assert "vlm 1" in capsys.readouterr().out
    (row,) = pq.read_table(output / "manifest.parquet").to_pylist()
    assert row["caption_source"] == "vlm" and isinstance(row["caption"], str)
    assert (output / ".work" / "captions" / f"{row['video_id']}.json").is_file()
