import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import mugen.train.checkpoint as checkpoint_module
from mugen.errors import MugenError
from mugen.train.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    restore_rng_state,
    save_checkpoint,
)


class TiedNet(nn.Module):
    """An embedding whose weight is shared with the output layer, plus a buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.hidden = nn.Linear(3, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor([2.0]))


def fresh_net(seed):
    torch.manual_seed(seed)
    return TiedNet()


def test_round_trip_restores_weights_state_and_latest(tmp_path):
    source = fresh_net(0)
    state = {"step": 7, "numbers": torch.arange(4), "config": {"lr": 0.1, "betas": (0.9, 0.99)}}
    path = save_checkpoint(tmp_path, 7, source, state, meta={"note": "x"})

    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "training_state.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000007"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and meta["note"] == "x" and meta["tied_aliases"] == {"out.weight": "embed.weight"}
    assert latest_checkpoint(tmp_path) == path

    target = fresh_net(1)
    assert not torch.equal(target.hidden.weight, source.hidden.weight)
    loaded = load_checkpoint(path, target)
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    assert target.out.weight is target.embed.weight  # still tied after loading
    assert loaded["step"] == 7 and torch.equal(loaded["numbers"], torch.arange(4))
    assert loaded["config"]["betas"] == (0.9, 0.99)


def test_failed_save_leaves_no_partial_directory_and_latest_unchanged(tmp_path, monkeypatch):
    model = fresh_net(0)
    save_checkpoint(tmp_path, 1, model, {"step": 1})

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, {"step": 2})

    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert latest_checkpoint(tmp_path) == root / "step_00000001"


def test_failure_while_writing_training_state_also_cleans_up(tmp_path, monkeypatch):
    model = fresh_net(0)

    def broken_torch_save(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_torch_save)
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 3, model, {"step": 3})
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert latest_checkpoint(tmp_path) is None


def test_prune_keeps_the_newest(tmp_path):
    model = fresh_net(0)
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep_checkpoints=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000030", "step_00000040"]


def test_latest_falls_back_to_newest_complete_directory(tmp_path):
    model = fresh_net(0)
    save_checkpoint(tmp_path, 5, model, {"step": 5})
    save_checkpoint(tmp_path, 6, model, {"step": 6})
    (tmp_path / "checkpoints" / "latest").unlink()  # as after a crash between rename and pointer update
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000006"
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099\n")
    with pytest.raises(MugenError, match="step_00000099"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_load_model_weights_reports_mismatches_clearly(tmp_path):
    path = save_checkpoint(tmp_path, 1, fresh_net(0), {"step": 1})

    with pytest.raises(MugenError, match="does not exist"):
        load_model_weights(fresh_net(0), tmp_path / "missing.safetensors")

    wider = fresh_net(0)
    wider.hidden = nn.Linear(3, 4)
    with pytest.raises(MugenError, match=r"hidden.weight saved \(3, 3\) vs model \(4, 3\)"):
        load_model_weights(wider, path)

    extended = fresh_net(0)
    extended.extra = nn.Linear(2, 2)
    with pytest.raises(MugenError, match="missing \\['extra.weight', 'extra.bias'\\]"):
        load_model_weights(extended, path)
    load_model_weights(extended, path, strict=False)  # the shared keys load, the new layer keeps its init
    assert torch.equal(extended.hidden.weight, fresh_net(0).hidden.weight)

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MugenError, match="cannot read"):
        load_model_weights(fresh_net(0), tmp_path / "junk.safetensors")


def test_rng_state_round_trip():
    state = capture_rng_state()
    drawn = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert drawn[0] == again[0] and drawn[1] == again[1] and torch.equal(drawn[2], again[2])
