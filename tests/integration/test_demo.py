"""`mugen demo` code path end to end with a few steps per stage (the real run takes minutes)."""

import json
from dataclasses import replace

from mugen.commands.demo import apply_overrides
from mugen.demo import DEMO_PRESETS, run_demo


def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
    config = apply_overrides(
        DEMO_PRESETS["cpu"],
        ["size=32", "vae_real_clips=2", "vae_procedural_clips=2", "vae_steps=2", "vae_train_crop=0", "heldout_clips=2",
         "seeds_per_spec=1", "dit_steps=2", "dit_batch_size=8", "sample_steps=2", "t2v_prompts=2", "i2v_samples=1"],
    )
    report = run_demo(tmp_path, replace(config, clip_frames=9))
    assert report == tmp_path / "report.md"
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["timings_s"]) == {"vae_train", "vae_eval", "encode", "dit_train", "generate", "evaluate"}
    assert results["t2v_adherence"]["num_samples"] == 2 and results["ti2v_adherence"]["num_samples"] == 1
    assert results["vae"]["heldout_real_psnr_db"] > 0
    row = results["t2v_rows"][0]
    assert set(row["detected"]) == {"colour", "shape", "direction"} and row["prompt"].startswith("a ")
    text = report.read_text()
    for image in ("vae_run/loss_curve.png", "dit_run/loss_curve.png", "samples/t2v_00.png", "samples/i2v_00.png", "samples/ti2v_00.png"):
        assert image in text and (tmp_path / image).is_file()
    assert "<table>" in (tmp_path / "report.html").read_text()
    # run again in the same folder: every stage resumes or overwrites, nothing breaks
    assert run_demo(tmp_path, replace(config, clip_frames=9)) == report
