"""Executors: every item comes back once, as a result or as the exception that stopped it."""

import os
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from _c2_tasks import square_or_fail
from _c2_videos import write_scrolling_video
from mugen.data.curation.executors import InlineExecutor, ProcessExecutor, make_executor
from mugen.errors import MugenError


def _outcomes(executor, items):
    try:
        return dict(executor.map_unordered(square_or_fail, items))
    finally:
        executor.close()


def test_inline_executor_reports_exceptions_and_goes_on():
    outcomes = _outcomes(InlineExecutor(), [1, 2, 3, 4])
    assert {k: v for k, v in outcomes.items() if k != 3} == {1: 1, 2: 4, 4: 16}
    assert isinstance(outcomes[3], ValueError)


def test_process_executor_survives_a_raising_task_and_a_dying_worker():
    # One item in flight at a time: with two, item 3 could still be in flight when item 5 kills the
    # pool, and would then (correctly) be reported as BrokenProcessPool instead of its ValueError.
    outcomes = _outcomes(ProcessExecutor(workers=2, max_in_flight=1), [1, 2, 3, 4, 5, 6, 7, 8])
    assert sorted(outcomes) == [1, 2, 3, 4, 5, 6, 7, 8]  # every item reported exactly once
    assert isinstance(outcomes[3], ValueError)
    assert isinstance(outcomes[5], BrokenProcessPool)
    # items submitted after the pool broke ran in a fresh pool
    assert outcomes[8] == 64 and outcomes[7] == 49
    values = [v for v in outcomes.values() if not isinstance(v, BaseException)]
    assert all(isinstance(v, int) for v in values) and len(values) >= 4


def test_make_executor_choices():
    assert isinstance(make_executor("local", 1), InlineExecutor)
    pool = make_executor("local", 2)
    assert isinstance(pool, ProcessExecutor) and pool.max_in_flight == 4
    with pytest.raises(MugenError, match="executor"):
        make_executor("dask", 2)
    with pytest.raises(MugenError, match="workers"):
        make_executor("local", 0)


def test_ray_executor_runs_the_pipeline_on_a_local_ray_instance(tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed for this Python: pip install ray")
    from mugen.data.curation.pipeline import CurationConfig, run_curation
    import mugen

    inputs = tmp_path / "in"
    write_scrolling_video(inputs / "a.mp4", seed=1, num_frames=30)
    write_scrolling_video(inputs / "b.mp4", seed=2, num_frames=30)
    (inputs / "bad.mp4").write_bytes(b"not a video at all")
    package_root = str(Path(mugen.__file__).resolve().parents[1])
    pythonpath = os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, log_to_driver=False)
    try:
        result = run_curation(
            inputs, tmp_path / "out", CurationConfig(), stages=("probe",), executor="ray", write_report_files=False
        )
        assert ray.is_initialized()  # the executor leaves an instance it did not start alone
    finally:
        ray.shutdown()
    assert result.videos == 3 and result.videos_processed == 3
    assert result.clips == 2 and result.rejected_videos == 1
    import pyarrow.parquet as pq

    rows = pq.read_table(result.manifest).to_pylist()
    assert sorted(Path(row["source_path"]).name for row in rows) == ["a.mp4", "b.mp4"]
    assert all(row["num_frames"] == 30 and (tmp_path / "out" / row["clip_path"]).is_file() for row in rows)
    rejection = pq.read_table(result.rejections).to_pylist()[0]
    assert rejection["source_path"].endswith("bad.mp4") and rejection["stage"] == "probe" and rejection["reason"]
