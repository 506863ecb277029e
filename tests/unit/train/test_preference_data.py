"""Preference manifests, the source-mixing sampler and a whole preference run (seed §4.2.3)."""

from collections import Counter

import pytest
import torch

from mugen.cli import main
from mugen.errors import MugenError
from mugen.models.dit import MUGDiT, dit_config
from mugen.models.dit.io import load_dit, write_run_config
from mugen.train.checkpoint import MODEL_FILE
from mugen.train.preference import PreferenceTaskConfig
from mugen.train.preference_data import PreferenceDataset, SourceMixBatchSampler, write_preference_dataset
from mugen.train.runs import PreferenceRunSpec, train_preference
from mugen.train.trainer import TrainConfig

TEXT_DIM = 16


def _dpo_entries(count, source="a", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "latents_w": torch.randn(24, 2, 4, 4, generator=g),
            "latents_l": torch.randn(24, 2, 4, 4, generator=g),
            "text_states": torch.randn(3 + i % 3, TEXT_DIM, generator=g),
            "text_mask": torch.ones(3 + i % 3, dtype=torch.bool),
            "fps": 8.0,
            "source": source,
        }
        for i in range(count)
    ]


def _kto_entries(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "latents": torch.randn(24, 2, 4, 4, generator=g),
            "label": i % 2,
            "text_states": torch.randn(4, TEXT_DIM, generator=g),
            "text_mask": torch.ones(4, dtype=torch.bool),
            "fps": 8.0,
            "source": "checks",
        }
        for i in range(count)
    ]


def test_manifest_round_trip_keeps_every_tensor(tmp_path):
    entries = _dpo_entries(3) + _dpo_entries(2, source="b", seed=1)
    manifest = write_preference_dataset(tmp_path / "prefs", entries)
    dataset = PreferenceDataset.from_manifest(manifest)
    assert dataset.kind == "dpo" and len(dataset) == 5 and dataset.sources() == ["a", "a", "a", "b", "b"]
    for original, loaded in zip(entries, dataset.entries):
        assert torch.equal(original["latents_w"], loaded["latents_w"])
        assert torch.equal(original["latents_l"], loaded["latents_l"])
        assert torch.equal(original["text_states"], loaded["text_states"])
    batch = dataset.collate([dataset[0], dataset[1], dataset[2]])
    assert batch["latents_w"].shape == (3, 24, 2, 4, 4) and batch["text_states"].shape == (3, 5, TEXT_DIM)
    assert batch["text_mask"].sum(1).tolist() == [3, 4, 5]  # right padding is masked

    kto = PreferenceDataset.from_manifest(write_preference_dataset(tmp_path / "kto", _kto_entries(4)))
    assert kto.kind == "kto" and [e["label"] for e in kto.entries] == [0, 1, 0, 1]


def test_bad_manifests_are_named(tmp_path):
    with pytest.raises(MugenError, match="does not exist"):
        PreferenceDataset.from_manifest(tmp_path / "missing.parquet")
    bad = _dpo_entries(1)
    bad[0]["latents_l"] = torch.randn(24, 1, 4, 4)
    with pytest.raises(MugenError, match="same latent shape|one latent shape"):
        PreferenceDataset(bad, "dpo")


def test_sources_mix_in_the_configured_ratio_and_batches_never_mix_sources():
    sources = ["motion"] * 40 + ["errors"] * 10
    sampler = SourceMixBatchSampler(sources, [(2, 4, 4)] * 50, batch_size=4, ratios={"motion": 3.0, "errors": 1.0}, seed=0, batches_per_epoch=400)
    picks = Counter()
    for batch in sampler.epoch_batches(0):
        names = {sources[i] for i in batch}
        assert len(names) == 1
        picks[names.pop()] += 1
    assert picks["motion"] / 400 == pytest.approx(0.75, abs=0.06)  # 3 : 1
    with pytest.raises(MugenError, match="one ratio per source"):
        SourceMixBatchSampler(sources, [(1,)] * 50, 4, {"motion": 1.0})


def test_source_mix_sampler_resumes_at_the_next_batch():
    sources = ["a"] * 9 + ["b"] * 7
    make = lambda: SourceMixBatchSampler(sources, [(1,)] * 16, 3, {"a": 1.0, "b": 2.0}, seed=5, batches_per_epoch=10)
    full = make()
    full.set_epoch(1)
    expected = list(full)
    first = make()
    first.set_epoch(1)
    head = [batch for _, batch in zip(range(4), first)]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert head + list(resumed) == expected


def _policy_run(folder, seed=0):
    torch.manual_seed(seed)
    config = dit_config("debug", text_dim=TEXT_DIM, hidden_size=24, depth=1, num_heads=2)
    model = MUGDiT(config)
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / MODEL_FILE))
    write_run_config(folder, {"dit": config.to_dict(), "preset": "debug", "shift_base_resolution": 64 * 64})
    return model


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_preference_run_moves_the_policy_and_writes_a_loadable_run(tmp_path, kind):
    start = _policy_run(tmp_path / "sft")
    entries = _dpo_entries(8) if kind == "dpo" else _kto_entries(8)
    manifest = write_preference_dataset(tmp_path / "data", entries)
    spec = PreferenceRunSpec(
        policy=str(tmp_path / "sft"),
        output_dir=str(tmp_path / "run"),
        kind=kind,
        manifest=str(manifest),
        train=TrainConfig(steps=6, lr=1e-3, warmup_steps=0, log_every=1, checkpoint_every=0),
        task=PreferenceTaskConfig(beta=50.0, shift_base_resolution=64 * 64),
        batch_size=4,
    )
    history = train_preference(spec)
    assert len(history) == 6
    key = "reward_accuracy" if kind == "dpo" else "reference_point"
    assert all(key in record for record in history)
    tuned, record = load_dit(tmp_path / "run")
    assert record["preference"]["kind"] == kind
    moved = max((a - b).abs().max().item() for a, b in zip(tuned.state_dict().values(), start.state_dict().values()))
    assert moved > 0  # the policy trained; the frozen reference (the SFT weights) did not leak in
    with pytest.raises(MugenError, match="use `mugen train"):
        train_preference(PreferenceRunSpec(policy=spec.policy, output_dir=str(tmp_path / "x"), kind="kto" if kind == "dpo" else "dpo", manifest=str(manifest)))


def test_train_dpo_command_interleaves_sources_and_writes_a_run(tmp_path, capsys):
    _policy_run(tmp_path / "sft")
    manifest = write_preference_dataset(tmp_path / "prefs", _dpo_entries(6, "motion") + _dpo_entries(4, "style", seed=1))
    code = main([
        "train", "dpo", "--manifest", str(manifest), "--policy", str(tmp_path / "sft"), "--output", str(tmp_path / "run"),
        "--steps", "3", "--batch-size", "2", "--beta", "100", "--source-ratio", "motion=3", "--source-ratio", "style=1",
    ])
    assert code == 0
    _, record = load_dit(tmp_path / "run")
    assert record["preference"]["source_ratios"] == {"motion": 3.0, "style": 1.0}
    assert record["preference"]["task"]["beta"] == 100.0


def test_bad_source_ratio_is_one_line(tmp_path, capsys):
    _policy_run(tmp_path / "sft")
    manifest = write_preference_dataset(tmp_path / "prefs", _dpo_entries(2))
    code = main(["train", "dpo", "--manifest", str(manifest), "--policy", str(tmp_path / "sft"), "--output", str(tmp_path / "run"), "--source-ratio", "motion"])
    assert code == 2
    assert "SOURCE=RATIO" in capsys.readouterr().err
