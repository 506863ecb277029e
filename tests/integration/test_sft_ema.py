"""Annealed SFT with post-hoc EMA (seed §4.2.3) on a tiny run: online EMA, snapshots, `mugen posthoc-ema`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from latent_data import build_latent_dataset
from mugen.cli import main
from mugen.models.dit import MUGDiT
from mugen.models.dit.io import load_dit
from mugen.train.ema import warmup_decay
from mugen.train.posthoc_ema import gamma_from_sigma_rel, solve_posthoc_ema_weights
from mugen.train.runs import DiTRunSpec, train_dit
from mugen.train.tasks import DiTFlowTask, DiTTaskConfig
from mugen.train.trainer import TrainConfig

STEPS = 6


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return build_latent_dataset(tmp_path_factory.mktemp("data"))


def spec(manifest, output, snapshot_every, checkpoint_every=0, ema_decay=0.9):
    return DiTRunSpec(
        manifest=str(manifest),
        output_dir=str(output),
        preset="debug",
        model_overrides={"depth": 1},
        train=TrainConfig(steps=STEPS, lr=5e-3, decay="linear", log_every=3, checkpoint_every=checkpoint_every, keep_checkpoints=1),
        task=DiTTaskConfig(text_dropout=0.0),
        batch_size=2,
        ema_decay=ema_decay,
        snapshot_every=snapshot_every,
    )


@pytest.fixture(scope="module")
def every_step_run(manifest, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "every_step"
    train_dit(spec(manifest, output, snapshot_every=1, checkpoint_every=2))
    return output


def _initial_parameters(run):
    from mugen.models.dit.model import MUGDiTConfig

    record = json.loads((run / "model_config.json").read_text())
    torch.manual_seed(0)  # train_dit seeds with train.seed before building the model
    return MUGDiT(MUGDiTConfig.from_dict(record["dit"]))


def test_snapshots_are_kept_and_the_exported_ema_is_the_hand_computed_average(every_step_run):
    run = every_step_run
    snapshots = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snapshots == [f"step_{s:08d}" for s in range(1, STEPS + 1)]  # none pruned (keep_checkpoints=1)
    assert len(list((run / "checkpoints").glob("step_*"))) == 1
    model = _initial_parameters(run)
    parameter_names = [name for name, _ in model.named_parameters()]
    expected = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    for step in range(1, STEPS + 1):
        weights = load_file(str(run / "snapshots" / f"step_{step:08d}" / "model.safetensors"))
        decay = warmup_decay(0.9, step)
        for name in parameter_names:
            expected[name] = decay * expected[name] + (1 - decay) * weights[name].double()
    exported = load_file(str(run / "ema" / "model.safetensors"))
    moved = 0.0
    for name in parameter_names:
        torch.testing.assert_close(exported[name].double(), expected[name], rtol=1e-5, atol=1e-6)
        moved = max(moved, float((exported[name] - weights[name]).abs().max()))
    assert moved > 1e-4  # the EMA is not just the last weights
    ema_model, record = load_dit(run / "ema")
    assert record["ema"] == {"decay": 0.9, "updates": STEPS}


def test_resumed_run_continues_the_ema_and_snapshots_exactly(every_step_run, manifest, tmp_path, monkeypatch):
    original = DiTFlowTask.compute_loss
    calls = {"n": 0}

    def dies_in_step_4(self, model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, model, batch, generator)

    monkeypatch.setattr(DiTFlowTask, "compute_loss", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_dit(spec(manifest, tmp_path / "resumed", snapshot_every=1, checkpoint_every=2))
    monkeypatch.setattr(DiTFlowTask, "compute_loss", original)
    train_dit(spec(manifest, tmp_path / "resumed", snapshot_every=1, checkpoint_every=2))
    for relative in ("ema/model.safetensors", f"snapshots/step_{STEPS:08d}/model.safetensors", f"snapshots/step_{STEPS:08d}/power_ema_0.0500.safetensors"):
        straight = load_file(str(every_step_run / relative))
        resumed = load_file(str(tmp_path / "resumed" / relative))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), relative


def test_posthoc_ensemble_writes_the_hand_weighted_average(manifest, tmp_path):
    run = tmp_path / "run"
    train_dit(spec(manifest, run, snapshot_every=2, ema_decay=None))
    assert not (run / "ema").exists()
    out = tmp_path / "ensemble"
    assert main(["posthoc-ema", "--run", str(run), "--method", "ensemble", "--half-life-steps", "2", "--output", str(out)]) == 0
    raw = [1.0 * 0.5 ** ((STEPS - s) / 2) for s in (2, 4, 6)]
    weights = [w / sum(raw) for w in raw]  # 1/7, 2/7, 4/7
    snapshots = [load_file(str(run / "snapshots" / f"step_{s:08d}" / "model.safetensors")) for s in (2, 4, 6)]
    combined = load_file(str(out / "model.safetensors"))
    for name, tensor in combined.items():
        if tensor.is_floating_point():
            hand = sum(w * snap[name].double() for w, snap in zip(weights, snapshots))
            torch.testing.assert_close(tensor.double(), hand, rtol=1e-6, atol=1e-7)
    model, record = load_dit(out)  # a loadable run folder
    assert record["posthoc_ema"]["method"] == "ensemble"
    assert json.loads((out / "posthoc_ema.json").read_text())["weights"] == pytest.approx([1 / 7, 2 / 7, 4 / 7])


def test_posthoc_power_combines_the_stored_power_emas(manifest, tmp_path, capsys):
    run = tmp_path / "run"
    train_dit(spec(manifest, run, snapshot_every=3, ema_decay=None))
    out = tmp_path / "power"
    assert main(["posthoc-ema", "--run", str(run), "--method", "power", "--sigma-rel", "0.08", "--output", str(out)]) == 0
    files = [(s, sigma) for s in (3, 6) for sigma in (0.05, 0.10)]
    weights = solve_posthoc_ema_weights([s for s, _ in files], [gamma_from_sigma_rel(sigma) for _, sigma in files], STEPS, 0.08)
    tensors = [load_file(str(run / "snapshots" / f"step_{s:08d}" / f"power_ema_{sigma:.4f}.safetensors")) for s, sigma in files]
    combined = load_file(str(out / "model.safetensors"))
    for name, tensor in combined.items():
        if tensor.is_floating_point():
            hand = sum(float(w) * t[name].double() for w, t in zip(weights, tensors))
            torch.testing.assert_close(tensor.double(), hand, rtol=1e-6, atol=1e-7)
    load_dit(out)
    assert main(["posthoc-ema", "--run", str(run), "--method", "power", "--output", str(tmp_path / "x")]) == 2
    assert "--sigma-rel" in capsys.readouterr().err


def test_generate_use_ema_without_an_exported_ema_is_named(manifest, tmp_path, capsys):
    run = tmp_path / "run"
    train_dit(spec(manifest, run, snapshot_every=0, ema_decay=None))
    code = main(["generate", "--checkpoint", str(run), "--use-ema", "--prompt", "a ball", "--output", str(tmp_path / "v.mp4"), "--device", "cpu"])
    assert code == 2 and "--ema-decay" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


def test_train_dit_flags_write_ema_and_power_snapshots(manifest, tmp_path):
    out = tmp_path / "cli"
    args = ["train", "dit", "--manifest", str(manifest), "--steps", "2", "--batch-size", "2", "--output", str(out), "--device", "cpu"]
    assert main(args + ["--ema-decay", "0.9", "--snapshot-every", "1", "--power-ema-sigma-rel", "0.07"]) == 0
    assert sorted(p.name for p in (out / "snapshots" / "step_00000002").iterdir()) == ["model.safetensors", "power_ema_0.0700.safetensors"]
    assert json.loads((out / "ema" / "model_config.json").read_text())["ema"] == {"decay": 0.9, "updates": 2}
    assert main(["posthoc-ema", "--run", str(out), "--method", "power", "--sigma-rel", "0.05", "--output", str(tmp_path / "p")]) == 0


def test_shipped_annealed_sft_config_sets_the_averaging(manifest, tmp_path):
    from pathlib import Path

    shipped = json.loads((Path(__file__).resolve().parents[2] / "configs" / "sft_posthoc_ema.json").read_text())
    shipped["train"].update(steps=2, checkpoint_every=0)
    shipped["averaging"]["snapshot_every"] = 2
    config = tmp_path / "sft.json"
    config.write_text(json.dumps(shipped))
    out = tmp_path / "sft"
    assert main(["train", "dit", "--manifest", str(manifest), "--config", str(config), "--output", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "ema" / "model_config.json").read_text())["ema"]["decay"] == 0.999
    assert sorted(p.name for p in (out / "snapshots" / "step_00000002").iterdir()) == [
        "model.safetensors", "power_ema_0.0500.safetensors", "power_ema_0.1000.safetensors"
    ]
