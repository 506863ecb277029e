"""`mugen plan` end to end: the table, the recommendation, the JSON record and clear errors."""

import json

from mugen.cli import main


def test_plan_prints_a_table_and_recommends_a_fitting_layout(tmp_path, capsys):
    record_path = tmp_path / "plan.json"
    argv = ["plan", "--preset", "2B", "--resolution", "720p", "--frames", "80", "--gpu", "h200", "--gpus", "16",
            "--json", str(record_path)]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps to the terminal width
    assert "N = 36,002" in out and "16 x H200" in out  # 10 latent frames x 45 x 80 patches + 2
    assert "recommended:" in out
    record = json.loads(record_path.read_text())
    candidates = record["candidates"]
    fitting = [c for c in candidates if c["fits"]]
    assert record["recommended"] == fitting[0]["layout"]
    assert fitting[0]["time_s"]["step_s"] == min(c["time_s"]["step_s"] for c in fitting)
    assert all(c["peak_gib"] <= record["usable_gib"] for c in fitting)
    assert all(c["dp"] * c["tp"] * c["cp"] * c["pp"] == 16 for c in candidates)
    assert {"parameters", "gradients", "optimizer", "activations", "attention_workspace"} <= set(candidates[0]["memory_gib"])


def test_plan_reports_when_nothing_fits(capsys):
    assert main(["plan", "--preset", "18B", "--resolution", "1080p", "--latent-frames", "30", "--gpus", "1"]) == 0
    assert "no layout fits" in " ".join(capsys.readouterr().out.split())


def test_plan_rejects_unknown_gpus_and_shapes(capsys):
    assert main(["plan", "--gpu", "a100"]) == 2
    assert "--gpu 'a100'" in capsys.readouterr().err
    assert main(["plan", "--latent-shape", "10x45"]) == 2
    assert "TxHxW" in capsys.readouterr().err
