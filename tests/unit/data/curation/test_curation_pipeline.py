"""The curation orchestrator: inputs, stages, per-video failures, resuming after a SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from _c2_pipeline_config import lenient_config
from _c2_videos import write_scrolling_video
from mugen.data.curation import pipeline
from mugen.data.curation.pipeline import (
    CurationConfig,
    list_inputs,
    parse_stages,
    run_curation,
    run_manifest_stage,
)
from mugen.errors import MugenError

HERE = Path(__file__).parent


def _videos(folder: Path, names=("a", "b"), num_frames=30) -> Path:
    for seed, name in enumerate(names):
        write_scrolling_video(folder / f"{name}.mp4", seed=seed, num_frames=num_frames)
    return folder


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_list_inputs_folder_and_list_file(tmp_path):
    (tmp_path / "in" / "youtube").mkdir(parents=True)
    (tmp_path / "in" / ".hidden").mkdir()
    for name in ("top.mp4", "youtube/x.MOV", ".hidden/y.mp4", "top.txt", "notes.json"):
        (tmp_path / "in" / name).write_bytes(b"x")
    tasks = list_inputs(tmp_path / "in")
    assert [(Path(t.path).name, t.source) for t in tasks] == [("top.mp4", "default"), ("x.MOV", "youtube")]
    assert tasks[0].video_id.startswith("top-") and len(tasks[0].video_id) == len("top-") + 8
    listing = tmp_path / "list.txt"
    listing.write_text("# videos\nin/top.mp4\n\nin/top.mp4\n" + str(tmp_path / "in/youtube/x.MOV") + "\n")
    assert [t.video_id for t in list_inputs(listing)] == [tasks[0].video_id, tasks[1].video_id]  # duplicates dropped
    with pytest.raises(MugenError, match="does not exist"):
        list_inputs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MugenError, match="no video files"):
        list_inputs(tmp_path / "empty")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(MugenError, match="lists no videos"):
        list_inputs(tmp_path / "empty.txt")


def test_parse_stages_and_config_errors(tmp_path):
    assert parse_stages(None) == pipeline.STAGES
    assert parse_stages("filter,probe") == ("probe", "filter")
    with pytest.raises(MugenError, match="unknown stage"):
        parse_stages("probe,blur")
    with pytest.raises(MugenError, match="must include probe"):
        parse_stages("split")
    with pytest.raises(MugenError, match="balance"):
        parse_stages("probe,balance")
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"filter": {"sharpness_range": [10, 20]}, "balance": {"temperature": 1.0}}))
    config = CurationConfig.from_json(config_file)
    assert config.filter.sharpness_range == (10, 20) and config.balance.temperature == 1.0
    config_file.write_text(json.dumps({"filters": {}}))
    with pytest.raises(MugenError, match="unknown sections"):
        CurationConfig.from_json(config_file)
    config_file.write_text(json.dumps({"filter": {"sharpnes_range": [1, 2]}}))
    with pytest.raises(MugenError, match="unknown keys"):
        CurationConfig.from_json(config_file)


def test_failures_in_one_video_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    inputs = _videos(tmp_path / "in", ("a", "b", "c"))
    (tmp_path / "in" / "empty.mp4").write_bytes(b"")
    original = pipeline.split_and_score

    def split_or_crash(path, probe, split_config, filter_config):
        if Path(path).name == "b.mp4":
            raise RuntimeError("detector exploded")
        return original(path, probe, split_config, filter_config)

    monkeypatch.setattr(pipeline, "split_and_score", split_or_crash)
    result = run_curation(inputs, tmp_path / "out", lenient_config(), stages=("probe", "split", "filter"), write_report_files=False)
    rejections = {Path(r["source_path"]).name: r for r in _rows(result.rejections)}
    assert set(rejections) == {"b.mp4", "empty.mp4"}
    assert rejections["b.mp4"]["stage"] == "split" and rejections["b.mp4"]["reason"] == "error"
    assert "detector exploded" in rejections["b.mp4"]["message"]
    assert rejections["empty.mp4"]["stage"] == "probe" and rejections["empty.mp4"]["reason"] == "zero_length"
    rows = _rows(result.manifest)
    assert {Path(r["source_path"]).name for r in rows} == {"a.mp4", "c.mp4"}
    assert all(r["passed_filters"] and r["score_motion"] > 0 and r["clip_path"] for r in rows)
    for row in rows:  # clips are real H.264 files of the clip's length
        import av

        with av.open(str(tmp_path / "out" / row["clip_path"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert sum(1 for _ in container.decode(stream)) == row["num_frames"]
    # clip ranges tile each video without overlap
    for name in ("a.mp4", "c.mp4"):
        ranges = sorted((r["start_frame"], r["end_frame"]) for r in rows if r["source_path"].endswith(name))
        assert all(first[1] <= second[0] for first, second in zip(ranges, ranges[1:]))


def test_clips_of_an_output_inside_the_input_are_not_curated_again(tmp_path):
    inputs = _videos(tmp_path / "in", ("a",))
    first = run_curation(inputs, inputs / "out", lenient_config(), stages=("probe",), write_report_files=False)
    assert (inputs / "out" / _rows(first.manifest)[0]["clip_path"]).is_file()
    again = run_curation(inputs, inputs / "out", lenient_config(), stages=("probe",), write_report_files=False)
    assert again.videos == 1 and again.videos_processed == 0


def test_references_mode_and_stages_without_split_or_filter(tmp_path):
    config = lenient_config()
    config.clips.mode = "references"
    result = run_curation(_videos(tmp_path / "in", ("a",)), tmp_path / "out", config, stages=("probe",), write_report_files=False)
    (row,) = _rows(result.manifest)
    assert (row["start_frame"], row["end_frame"], row["clip_path"]) == (0, 30, "")
    assert not any(name.startswith("score_") for name in row)
    assert row["keep"] and row["sample_weight"] == 1.0
    assert not (tmp_path / "out" / "clips").exists()


def test_resuming_with_other_settings_is_refused(tmp_path):
    inputs = _videos(tmp_path / "in", ("a",))
    run_curation(inputs, tmp_path / "out", lenient_config(), stages=("probe",), write_report_files=False)
    other = lenient_config()
    other.split.max_clip_s = 2.0
    with pytest.raises(MugenError, match="different per-video settings"):
        run_curation(inputs, tmp_path / "out", other, stages=("probe", "split"), write_report_files=False)


def test_killed_run_resumes_without_recomputing_or_duplicating(tmp_path, monkeypatch):
    names = ("a", "b", "c", "d")
    inputs = _videos(tmp_path / "in", names, num_frames=40)
    output = tmp_path / "out"
    call_log = tmp_path / "calls.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(pipeline.__file__).parents[3]), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(
        [sys.executable, str(HERE / "_c2_resume_run.py"), str(inputs), str(output), str(call_log), "c.mp4"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (call_log.exists() and "c.mp4" in call_log.read_text().split()):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run never reached the third video"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the whole session we started: the run and any child
        process.wait()
    assert process.returncode == -signal.SIGKILL
    shards = sorted((output / ".work" / "videos").glob("*.json"))
    assert [path.name.split("-")[0] for path in shards] == ["a", "b"]  # the finished videos only
    assert not (output / "manifest.parquet").exists()
    before = {path: path.stat().st_mtime_ns for path in shards + sorted((output / "clips").rglob("*.mp4"))}
    assert any(path.suffix == ".mp4" for path in before)

    # Restart in this process, recording which videos are worked on (every one starts with probe).
    calls = []
    original = pipeline.probe_video

    def recording_probe(path):
        calls.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(pipeline, "probe_video", recording_probe)
    stages = ("probe", "split", "filter", "dedup")
    result = run_curation(inputs, output, lenient_config(), stages=stages, write_report_files=False)
    assert calls == ["c.mp4", "d.mp4"]  # a and b were not recomputed
    assert result.videos_processed == 2 and result.videos == 4
    assert {path: path.stat().st_mtime_ns for path in before} == before  # their shards and clips untouched
    rows = _rows(result.manifest)
    clip_ids = [row["clip_id"] for row in rows]
    assert len(clip_ids) == len(set(clip_ids))
    assert {Path(row["source_path"]).stem for row in rows} == set(names)
    assert all(len(row["frame_hashes"]) == 3 for row in rows)

    # A third run finds everything done: no video recomputed, the same rows.
    calls.clear()
    again = run_curation(inputs, output, lenient_config(), stages=stages, write_report_files=False)
    assert calls == [] and again.videos_processed == 0
    assert [row["clip_id"] for row in _rows(again.manifest)] == clip_ids


def test_manifest_stages_run_alone(tmp_path):
    inputs = _videos(tmp_path / "in", ("a", "b"))
    (tmp_path / "in" / "a.txt").write_text("A red car drives along a city street.")
    (tmp_path / "in" / "b.txt").write_text("A red car drives along a city street.")
    config = lenient_config()
    result = run_curation(inputs, tmp_path / "out", config, stages=("probe", "split", "filter", "caption"), write_report_files=False)
    rows = _rows(result.manifest)
    assert all(row["caption_source"] == "sidecar" for row in rows)
    assert all(row["tag_subjects"] == [] for row in rows)

    summary = run_manifest_stage("tags", result.manifest, config)
    assert summary["tagged"] == len(rows)
    rows = _rows(result.manifest)
    assert all("car" in row["tag_subjects"] for row in rows)
    assert json.loads((tmp_path / "out" / "tags.json").read_text())["subjects"]["car"] == len(rows)

    summary = run_manifest_stage("dedup", result.manifest, config)
    assert summary["hashed"] == len(rows)  # computed now: the run had no dedup stage
    rows = _rows(result.manifest)
    assert all(len(row["frame_hashes"]) == 3 for row in rows)
    # a's and b's textures differ, so same captions alone do not make duplicates
    assert summary["duplicates"] == 0

    run_manifest_stage("balance", result.manifest, config)
    weights = [row["sample_weight"] for row in _rows(result.manifest)]
    assert sum(weights) == pytest.approx(len(rows))
    summary = run_manifest_stage("report", result.manifest, config)
    assert Path(summary["report"]).is_file()
    with pytest.raises(MugenError, match="--vlm"):
        run_manifest_stage("caption", result.manifest, config)
    with pytest.raises(MugenError, match="cannot run on a manifest"):
        run_manifest_stage("split", result.manifest, config)


def test_videos_lost_with_a_dead_worker_are_retried_on_restart(tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    from mugen.data.curation import executors

    class DyingWorkerExecutor(executors.InlineExecutor):
        """Reports b.mp4 as lost with its worker process, runs the others."""

        def map_unordered(self, function, items):
            for item in items:
                if item.task.path.endswith("b.mp4"):
                    yield item, BrokenProcessPool("a worker process died")
                else:
                    yield item, function(item)

    inputs = _videos(tmp_path / "in", ("a", "b"))
    stages = ("probe", "split", "filter")
    monkeypatch.setattr(executors, "make_executor", lambda *args, **kwargs: DyingWorkerExecutor())
    result = run_curation(inputs, tmp_path / "out", lenient_config(), stages=stages, write_report_files=False)
    (rejection,) = _rows(result.rejections)
    assert rejection["source_path"].endswith("b.mp4") and (rejection["stage"], rejection["reason"]) == ("worker", "crash")
    assert {Path(r["source_path"]).name for r in _rows(result.manifest)} == {"a.mp4"}
    monkeypatch.undo()
    again = run_curation(inputs, tmp_path / "out", lenient_config(), stages=stages, write_report_files=False)
    assert again.videos_processed == 1 and again.rejected_videos == 0  # only b was redone
    assert {Path(r["source_path"]).name for r in _rows(again.manifest)} == {"a.mp4", "b.mp4"}


def test_manifest_schema_round_trip_and_checks(tmp_path):
    from mugen.data.curation.manifest import clip_schema, read_clip_manifest, write_clip_manifest

    base = {"clip_id": "v-0000", "video_id": "v", "source_path": "/x/v.mp4", "start_frame": 0, "end_frame": 10}
    rows = [
        {**base, "score_sharpness": 250, "score_motion_backend": "dis", "score_aesthetic": None},
        {**base, "clip_id": "v-0001", "score_sharpness": 12.5, "score_aesthetic": 5.1, "tag_subjects": ["dog"]},
    ]
    schema = clip_schema(rows)
    assert str(schema.field("score_sharpness").type) == "double" and str(schema.field("score_motion_backend").type) == "string"
    path = write_clip_manifest(tmp_path / "manifest.parquet", rows)
    back = read_clip_manifest(path)
    assert [r["score_sharpness"] for r in back] == [250.0, 12.5] and back[0]["score_aesthetic"] is None
    assert back[0]["tag_subjects"] == [] and back[1]["tag_subjects"] == ["dog"]  # defaults filled in
    assert back[0]["keep"] is True and back[0]["duplicate_of"] is None
    with pytest.raises(MugenError, match="twice"):
        write_clip_manifest(tmp_path / "m2.parquet", [rows[0], rows[0]])
    with pytest.raises(ValueError, match="does not know"):
        clip_schema([{**base, "sharpness": 1.0}])  # scores must carry the score_ prefix
    import pyarrow as pa

    pq.write_table(pa.table({"sample_id": ["a"], "latent_path": ["a.safetensors"]}), tmp_path / "training.parquet")
    with pytest.raises(MugenError, match="not a curation manifest"):
        read_clip_manifest(tmp_path / "training.parquet")
