"""`mugen train dit` through a curriculum (seed §4.2.2): live source mix, exact mid-stage resume, plateau transitions."""

import json
from pathlib import Path

import pytest

from latent_data import build_latent_dataset
from mugen.cli import main
from mugen.train.checkpoint import load_checkpoint
from mugen.train.curriculum_run import CurriculumRunConfig, train_dit_curriculum
from mugen.train.runs import DiTRunSpec, load_run_config
from mugen.train.tasks import DiTFlowTask, DiTTaskConfig
from mugen.train.trainer import TrainConfig


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("curriculum_data")
    return {
        "images": str(build_latent_dataset(root / "images", videos=0, images=4, seed=1)),
        "videos": str(build_latent_dataset(root / "videos", videos=4, images=0, seed=2)),
        "held_out": str(build_latent_dataset(root / "held_out", videos=3, images=0, seed=3)),
    }


def two_stages(manifests, second_stage_extra=None):
    return {
        "validation_manifest": manifests["held_out"],
        "validation_every": 2,
        "validation_levels": 2,
        "stages": [
            {
                "name": "images_and_videos",
                "manifests": {manifests["images"]: 1.0, manifests["videos"]: 1.0},
                "image_manifests": [manifests["images"]],
                "image_ratio_start": 1.0,
                "image_ratio_end": 0.0,
                "max_steps": 4,
            },
            {"name": "videos_masked", "manifests": {manifests["videos"]: 1.0}, "first_frame_cond_prob": 1.0, **(second_stage_extra or {})},
        ],
    }


def spec(output, steps, lr=5e-3, checkpoint_every=0):
    return DiTRunSpec(
        manifest="",
        output_dir=str(output),
        model_overrides={"depth": 1},
        train=TrainConfig(steps=steps, lr=lr, log_every=4, checkpoint_every=checkpoint_every),
        task=DiTTaskConfig(text_dropout=0.0),
        batch_size=2,
    )


def test_mid_stage_resume_gives_the_uninterrupted_schedule_and_losses(manifests, tmp_path, monkeypatch):
    curriculum = two_stages(manifests)
    original = DiTFlowTask.compute_loss
    used = []  # the first-frame masking probability the flow task really ran with

    def recording(self, model, batch, generator):
        used.append(self.config.first_frame_cond_prob)
        return original(self, model, batch, generator)

    monkeypatch.setattr(DiTFlowTask, "compute_loss", recording)
    straight = train_dit_curriculum(spec(tmp_path / "straight", 7), curriculum)
    monkeypatch.setattr(DiTFlowTask, "compute_loss", original)
    assert used == [0, 0, 0, 0, 1, 1, 1]
    assert [r["curriculum_stage"] for r in straight] == [0, 0, 0, 0, 1, 1, 1]
    assert [r["image_ratio"] for r in straight[:4]] == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert [r["image_share"] for r in straight] == [1, *[r["image_share"] for r in straight[1:3]], 0, 0, 0, 0]
    assert [r["first_frame_cond_prob"] for r in straight] == [0, 0, 0, 0, 1, 1, 1]

    calls = {"n": 0}

    def dies_in_step_5(self, model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, model, batch, generator)

    monkeypatch.setattr(DiTFlowTask, "compute_loss", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_dit_curriculum(spec(tmp_path / "resumed", 7, checkpoint_every=3), curriculum)
    monkeypatch.setattr(DiTFlowTask, "compute_loss", original)
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000003")["extra"]["curriculum"]
    assert saved["schedule"]["stage_index"] == 0 and saved["schedule"]["step_in_stage"] == 3  # mid stage 1
    resumed = train_dit_curriculum(spec(tmp_path / "resumed", 7, checkpoint_every=3), curriculum)
    for key in ("loss", "curriculum_stage", "image_ratio", "image_share", "first_frame_cond_prob"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key
    logged = json.loads((tmp_path / "resumed" / "curriculum.json").read_text())
    assert [v["validation_loss"] for v in logged["validation"]] == [
        v["validation_loss"] for v in json.loads((tmp_path / "straight" / "curriculum.json").read_text())["validation"]
    ]


def test_stage_ends_when_the_validation_loss_stops_improving(manifests, tmp_path):
    curriculum = two_stages(manifests)
    curriculum["stages"][0].update(max_steps=None, image_ratio_end=1.0, plateau_patience=2, plateau_min_delta=1e-3)
    history = train_dit_curriculum(spec(tmp_path / "run", 8, lr=1e-9), curriculum)  # lr ~0: the loss cannot improve
    log = json.loads((tmp_path / "run" / "curriculum.json").read_text())["validation"]
    assert [v["step"] for v in log] == [2, 4, 6, 8]
    assert [v["plateau_transition"] for v in log] == [False, False, True, False]
    losses = [v["validation_loss"] for v in log[:3]]
    assert max(losses) - min(losses) < 1e-3
    assert [r["curriculum_stage"] for r in history] == [0] * 6 + [1] * 2


def test_improving_validation_loss_keeps_the_stage(manifests, tmp_path, monkeypatch):
    from mugen.train import curriculum_run

    falling = iter([1.0, 0.9, 0.8, 0.7])
    monkeypatch.setattr(curriculum_run.CurriculumProgress, "validation_loss", lambda self, model: next(falling))
    curriculum = two_stages(manifests)
    curriculum["stages"][0].update(max_steps=None, image_ratio_end=1.0, plateau_patience=2, plateau_min_delta=1e-3)
    history = train_dit_curriculum(spec(tmp_path / "run", 8, lr=1e-9), curriculum)
    assert {r["curriculum_stage"] for r in history} == {0}


def test_cli_runs_a_curriculum_config_and_the_shipped_example_parses(manifests, tmp_path, capsys):
    config = tmp_path / "curriculum.json"
    config.write_text(json.dumps({"train": {"steps": 5, "lr": 1e-3}, "model": {"depth": 1}, "data": {"batch_size": 2}, "curriculum": two_stages(manifests)}))
    assert main(["train", "dit", "--config", str(config), "--output", str(tmp_path / "run"), "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert [s["name"] for s in record["curriculum"]["stages"]] == ["images_and_videos", "videos_masked"]
    assert json.loads((tmp_path / "run" / "curriculum.json").read_text())["schedule"]["total_steps"] == 5
    assert (tmp_path / "run" / "curriculum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    shipped = Path(__file__).resolve().parents[2] / "configs" / "curriculum_example.json"
    parsed = CurriculumRunConfig.from_dict(load_run_config(shipped)["curriculum"])
    assert [stage.first_frame_cond_prob > 0 for stage in parsed.curriculum.stages] == [False, True, True]


def test_plateau_stage_without_validation_is_refused(manifests, tmp_path, capsys):
    curriculum = two_stages(manifests)
    curriculum.pop("validation_every")
    curriculum["stages"][0]["plateau_patience"] = 2
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"curriculum": curriculum}))
    assert main(["train", "dit", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    assert "validation" in capsys.readouterr().err
