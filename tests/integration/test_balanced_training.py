"""`mugen train dit --balanced`: cost-balanced micro-batches in a real MUG-DiT run, with speed logs."""

import json

from latent_data import build_latent_dataset
from mugen.cli import main


def test_train_dit_balanced_logs_balance_wait_and_tflops(tmp_path):
    manifest = build_latent_dataset(tmp_path / "data", videos=4, images=4, text_dim=32)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"train": {"grad_accum": 2, "log_every": 2, "warmup_steps": 0}, "model": {"depth": 1}}))
    argv = [
        "train", "dit", "--manifest", str(manifest), "--output", str(tmp_path / "run"), "--config", str(config),
        "--steps", "4", "--batch-size", "1", "--balanced", "--device", "cpu", "--prefetch", "2",
    ]
    assert main(argv) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    for line in lines:
        assert 0.0 <= line["data_wait_fraction"] <= 1.0
        assert line["model_tflops"] > 0 and "mfu" not in line  # the CPU has no datasheet peak
        assert line["rank_cost_imbalance"] >= 0.0
    state = __import__("torch").load(
        next((tmp_path / "run" / "checkpoints").glob("step_*")) / "training_state.pt", weights_only=False
    )
    assert state["sampler"]["kind"] == "balanced" and state["sampler"]["position"] == 4 * 2


def test_cost_coefficients_from_the_config_are_checked(tmp_path, capsys):
    manifest = build_latent_dataset(tmp_path / "data", videos=2, images=2, text_dim=32)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"data": {"cost_coefficients": [1.0, 2.0]}}))
    argv = ["train", "dit", "--manifest", str(manifest), "--output", str(tmp_path / "run"), "--config", str(config), "--balanced"]
    assert main(argv) == 2
    assert "cost_coefficients" in capsys.readouterr().err
