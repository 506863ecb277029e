"""`DiTRunSpec.init_from`: start a run from other weights (e.g. after `mugen expand`) with a fresh optimizer."""

import pytest
import torch
from safetensors.torch import save_file

from mugen.errors import MugenError
from mugen.models.dit import MUGDiT, dit_config
from mugen.models.dit.io import write_run_config
from mugen.train.checkpoint import MODEL_FILE
from mugen.train.expansion import expand_checkpoint
from mugen.train.runs import initialise_from


def _save_run(folder, config, seed):
    torch.manual_seed(seed)
    model = MUGDiT(config)
    for p in model.parameters():  # non-zero everywhere, so a load is visible
        torch.nn.init.normal_(p, std=0.02)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / MODEL_FILE))
    write_run_config(folder, {"dit": config.to_dict(), "preset": "debug"})
    return model


def test_init_from_an_expanded_checkpoint_loads_its_weights(tmp_path):
    narrow = dit_config("debug", text_dim=16, hidden_size=24, depth=1, num_heads=2)
    _save_run(tmp_path / "narrow", narrow, 0)
    expand_checkpoint(tmp_path / "narrow", tmp_path / "wide", factor=2, perturbation=0.0)
    wide = MUGDiT(dit_config("debug", text_dim=16, hidden_size=48, depth=1, num_heads=4))
    initialise_from(wide, tmp_path / "wide")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "wide" / MODEL_FILE))
    assert all(torch.equal(stored[k], v) for k, v in wide.state_dict().items())


def test_init_from_a_model_of_another_size_names_the_difference(tmp_path):
    _save_run(tmp_path / "small", dit_config("debug", text_dim=16, hidden_size=24, depth=1, num_heads=2), 0)
    other = MUGDiT(dit_config("debug", text_dim=16, hidden_size=24, depth=2, num_heads=2))
    with pytest.raises(MugenError, match="depth"):
        initialise_from(other, tmp_path / "small")
