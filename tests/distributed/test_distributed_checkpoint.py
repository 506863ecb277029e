"""Sharded checkpoints: save on 4 ranks, resume on 2 with another layout, export to the official files.

The uninterrupted single-process run trains 4 AdamW steps. The distributed run trains 2 steps on
dp_shard=2 x tp=2 (4 processes, asynchronous save), then a fresh job of 2 processes (dp_shard=2,
or tp=2) resumes from the checkpoint and trains steps 3 and 4: its losses must be those of the
uninterrupted run (rtol 1e-5, as in test_parallelize.py) and so must its weights (atol 2e-5).
"""

from __future__ import annotations

import json

import pytest
import torch
from launcher import run_distributed
from parallel_training import GLOBAL_BATCH, LEARNING_RATE, batch_loss, full_value, step_batch, tiny_dit, tiny_dit_config

from mugen.cli import main
from mugen.distributed.checkpoint import (
    DistributedCheckpointer,
    export_checkpoint,
    initialize_from_single_device,
    latest_distributed_checkpoint,
    load_full_state_dict,
)
from mugen.distributed.mesh import ParallelConfig, build_mesh
from mugen.distributed.parallelize import data_parallel_rank, parallelize_dit
from mugen.distributed.tensor_parallel import FUSED_ROWS_ATTRIBUTE
from mugen.errors import MugenError
from mugen.models.dit.model import MUGDiT
from mugen.models.dit.official import load_official_checkpoint, read_official_state_dict

SAVED_AFTER = 2
TOTAL_STEPS = 4
SAVE_LAYOUT = {"dp_shard": 2, "tp": 2}
LOSS_RTOL, WEIGHT_ATOL, WEIGHT_RTOL = 1e-5, 2e-5, 1e-4


def uninterrupted_run() -> dict:
    model = tiny_dit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    losses, saved_weights = [], None
    for step in range(TOTAL_STEPS):
        optimizer.zero_grad()
        loss = batch_loss(model, step_batch(step), 0, GLOBAL_BATCH)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step + 1 == SAVED_AFTER:
            saved_weights = {name: p.detach().clone() for name, p in model.state_dict().items()}
    return {"losses": losses, "saved_weights": saved_weights, "weights": {n: p.detach().clone() for n, p in model.state_dict().items()}}


def train_steps(rank, world_size, layout, output_dir, first_step, last_step, resume, async_save):
    config = ParallelConfig(param_dtype="fp32", **layout)
    mesh = build_mesh(config, device_type="cpu")
    model = parallelize_dit(tiny_dit(), mesh, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    checkpointer = DistributedCheckpointer(output_dir, model, optimizer, async_save=async_save, layout=layout, keep_checkpoints=1)
    assert checkpointer.async_save == async_save  # this torch writes in the background
    restored = checkpointer.load() if resume else None
    dp_index, dp_count = data_parallel_rank(mesh)
    share = GLOBAL_BATCH // dp_count
    losses = []
    start = restored["step"] if restored else first_step
    for step in range(start, last_step):
        optimizer.zero_grad()
        loss = batch_loss(model, step_batch(step), dp_index * share, (dp_index + 1) * share)
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(float(total) / world_size)
        if not resume and step + 1 < last_step:
            checkpointer.save(step + 1)  # in flight while the next step trains; pruned by the last save
    if not resume:
        checkpointer.save(last_step, {"data_position": {"epoch": 0, "batches_done": last_step}})
        checkpointer.wait()
    fused_rows = getattr(model, FUSED_ROWS_ATTRIBUTE, {})
    weights = {name: full_value(p, name, fused_rows) for name, p in model.named_parameters()}
    return {"restored": restored, "losses": losses, "weights": weights} if rank == 0 else None


@pytest.fixture(scope="module")
def reference() -> dict:
    return uninterrupted_run()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, reference) -> dict:
    output_dir = tmp_path_factory.mktemp("dcp")
    result = run_distributed(train_steps, 4, args=(SAVE_LAYOUT, str(output_dir), 0, SAVED_AFTER, False, True))[0]
    torch.testing.assert_close(result["losses"], reference["losses"][:SAVED_AFTER], rtol=LOSS_RTOL, atol=0)
    return {"output_dir": output_dir, **result}


def test_save_is_atomic_and_points_latest_at_it(saved_run):
    root = saved_run["output_dir"] / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert latest_distributed_checkpoint(saved_run["output_dir"]) == root / "step_00000002"
    assert sorted(path.name for path in root.iterdir()) == ["latest", "step_00000002"]  # no temp dirs; step 1 pruned
    meta = json.loads((root / "step_00000002" / "meta.json").read_text())
    assert meta["world_size"] == 4 and meta["layout"] == SAVE_LAYOUT and meta["model_config"]["depth"] == 2
    assert sorted(path.name for path in (root / "step_00000002" / "rng").iterdir()) == [f"rank_{r:05d}.pt" for r in range(4)]


@pytest.mark.parametrize("layout", [{"dp_shard": 2}, {"tp": 2}], ids=["dp_shard2", "tp2"])
def test_resume_on_two_ranks_continues_the_uninterrupted_run(saved_run, reference, layout):
    result = run_distributed(
        train_steps, 2, args=(layout, str(saved_run["output_dir"]), 0, TOTAL_STEPS, True, False)
    )[0]
    assert result["restored"] == {"step": SAVED_AFTER, "data_position": {"epoch": 0, "batches_done": SAVED_AFTER}}
    torch.testing.assert_close(result["losses"], reference["losses"][SAVED_AFTER:], rtol=LOSS_RTOL, atol=0)
    for name, weight in result["weights"].items():
        torch.testing.assert_close(weight, reference["weights"][name], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("file_name", ["dit.pt", "dit.safetensors"])
def test_export_to_official_layouts(saved_run, reference, tmp_path, file_name):
    step_dir = saved_run["output_dir"] / "checkpoints" / "step_00000002"
    path = export_checkpoint(step_dir, tmp_path / file_name)
    exported = read_official_state_dict(path)
    assert exported.keys() == reference["saved_weights"].keys()
    for name, tensor in exported.items():  # [q|k|v] rows in the official order, whatever the TP layout
        torch.testing.assert_close(tensor, reference["saved_weights"][name], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=lambda m: f"{name}: {m}")
    load_official_checkpoint(path, tiny_dit())  # loads strictly into the single-device model


def _load_official_file(rank, world_size, path, broadcast):
    config = ParallelConfig(param_dtype="fp32", dp_shard=2 if broadcast else 1, tp=2)
    with torch.device("meta"):  # no rank ever holds the whole model in memory
        model = MUGDiT(tiny_dit_config())
    model = parallelize_dit(model, build_mesh(config, device_type="cpu"), config)
    if broadcast:  # rank 0 builds the single-device model; the others receive its weights
        initialize_from_single_device(model, tiny_dit, "cpu")
    else:  # every rank reads the file
        model.to_empty(device="cpu")
        load_full_state_dict(model, read_official_state_dict(path), source=path)
    fused_rows = getattr(model, FUSED_ROWS_ATTRIBUTE, {})
    weights = {name: full_value(p, name, fused_rows) for name, p in model.named_parameters()}  # collectives
    return weights if rank == 0 else None


def test_official_file_loads_into_a_meta_initialised_tensor_parallel_model(reference, tmp_path):
    path = tmp_path / "dit.pt"
    torch.save(reference["saved_weights"], path)
    weights = run_distributed(_load_official_file, 2, args=(str(path), False))[0]
    assert weights.keys() == reference["saved_weights"].keys()
    for name, weight in weights.items():
        assert torch.equal(weight, reference["saved_weights"][name]), name


def test_single_device_initialisation_is_broadcast_into_the_shards():
    expected = tiny_dit().state_dict()
    weights = run_distributed(_load_official_file, 4, args=("", True))[0]
    for name, weight in weights.items():
        assert torch.equal(weight, expected[name]), name


def test_mugen_convert_reads_distributed_checkpoints(saved_run, reference, tmp_path):
    step_dir = saved_run["output_dir"] / "checkpoints" / "step_00000002"
    output = tmp_path / "dit.safetensors"
    assert main(["convert", "--checkpoint", str(step_dir), "--to", "safetensors", "--output", str(output)]) == 0
    exported = read_official_state_dict(output)
    torch.testing.assert_close(exported["blocks.1.attn.qkv.weight"], reference["saved_weights"]["blocks.1.attn.qkv.weight"], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL)


def test_expand_reads_a_distributed_checkpoint(saved_run, reference, tmp_path):
    # Seed §4.2.1 on a sharded checkpoint: `mugen expand` of the step folder written on 4 ranks equals
    # the expansion of the single-process weights (no perturbation: the map is exact).
    from mugen.models.dit.io import load_dit
    from mugen.train.expansion import expand_dit_state_dict

    step_dir = saved_run["output_dir"] / "checkpoints" / "step_00000002"
    assert main(["expand", "--checkpoint", str(step_dir), "--factor", "2", "--perturbation", "0", "--output", str(tmp_path / "x2")]) == 0
    expanded, record = load_dit(tmp_path / "x2")
    assert record["dit"]["hidden_size"] == 2 * tiny_dit_config().hidden_size
    expected, _ = expand_dit_state_dict(reference["saved_weights"], tiny_dit_config(), 2, perturbation=0.0)
    for name, tensor in expanded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=lambda m: f"{name}: {m}")


def test_export_refuses_a_directory_without_a_checkpoint(tmp_path):
    with pytest.raises(MugenError, match="has no .metadata"):
        export_checkpoint(tmp_path, tmp_path / "dit.pt")
