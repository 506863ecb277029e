"""Online EMA under FSDP2 (seed §4.2.3): sharded like the parameters, updated locally, saved and restored by DCP.

2 gloo processes, dp_shard=2, fp32: after 3 AdamW steps the gathered EMA equals the EMA of the
single-process run (fp32 tolerance), a save/restore round trip into a fresh model is exact (also
into a tp=2 model), and the exported EMA file equals the single-process EMA.
"""

from __future__ import annotations

import torch
from launcher import run_distributed
from parallel_training import GLOBAL_BATCH, LEARNING_RATE, batch_loss, step_batch, tiny_dit, tiny_dit_config
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from mugen.distributed.ema import EMACheckpointer, gathered_ema_state_dict, save_sharded_ema_weights
from mugen.distributed.mesh import ParallelConfig, build_mesh
from mugen.distributed.parallelize import data_parallel_rank, parallelize_dit
from mugen.models.dit.model import MUGDiT
from mugen.train.ema import EMA

STEPS = 3
DECAY = 0.8


def single_process_ema() -> dict:
    model = tiny_dit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    ema = EMA(model, decay=DECAY)
    for step in range(STEPS):
        optimizer.zero_grad()
        batch_loss(model, step_batch(step), 0, GLOBAL_BATCH).backward()
        optimizer.step()
        ema.update(model)
    return {name: tensor.detach().clone() for name, tensor in ema.shadow.items()}


def fsdp_ema_round_trip(rank, world_size, output_dir):
    config = ParallelConfig(param_dtype="fp32", dp_shard=2)
    mesh = build_mesh(config, device_type="cpu")
    model = parallelize_dit(tiny_dit(), mesh, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    ema = EMA(model, decay=DECAY)
    sharded = {
        name: isinstance(shadow, DTensor) and shadow.placements == parameter.placements and shadow.to_local().shape == parameter.to_local().shape
        for (name, parameter), shadow in ((item, ema.shadow[item[0]]) for item in model.named_parameters())
    }
    dp_index, dp_count = data_parallel_rank(mesh)
    share = GLOBAL_BATCH // dp_count
    for step in range(STEPS):
        optimizer.zero_grad()
        batch_loss(model, step_batch(step), dp_index * share, (dp_index + 1) * share).backward()
        optimizer.step()
        ema.update(model)
    gathered = gathered_ema_state_dict(ema, model)
    checkpointer = EMACheckpointer(output_dir, model, optimizer, ema=ema)
    checkpointer.save(STEPS, {"data_position": STEPS})
    save_sharded_ema_weights(ema, model, f"{output_dir}/ema.safetensors")

    torch.manual_seed(123)  # a fresh job: other weights, an EMA started from them
    fresh = parallelize_dit(MUGDiT(tiny_dit_config()), mesh, config)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    fresh_ema = EMA(fresh, decay=0.5, warmup=False)
    before = gathered_ema_state_dict(fresh_ema, fresh)
    restored_state = EMACheckpointer(output_dir, fresh, fresh_optimizer, ema=fresh_ema).load()
    restored = gathered_ema_state_dict(fresh_ema, fresh)

    tp_config = ParallelConfig(param_dtype="fp32", tp=2)  # another layout: fused [q|k|v] rows head-aligned
    tp_model = parallelize_dit(MUGDiT(tiny_dit_config()), build_mesh(tp_config, device_type="cpu"), tp_config)
    tp_ema = EMA(tp_model, decay=0.5)
    EMACheckpointer(output_dir, tp_model, ema=tp_ema).load()
    on_tp = gathered_ema_state_dict(tp_ema, tp_model)
    return {
        "restored_on_tp_exact": all(torch.equal(on_tp[n], gathered[n]) for n in gathered),
        "sharded": sharded,
        "gathered": gathered,
        "changed_by_load": any(not torch.equal(before[n], restored[n]) for n in restored),
        "restored_exact": all(torch.equal(restored[n], gathered[n]) for n in gathered),
        "restored_scalars": (fresh_ema.decay, fresh_ema.warmup, fresh_ema.updates),
        "restored_state": restored_state,
    } if rank == 0 else None


def test_fsdp_ema_matches_single_process_and_round_trips(tmp_path):
    reference = single_process_ema()
    result = run_distributed(fsdp_ema_round_trip, 2, args=(str(tmp_path),))[0]
    assert result["sharded"] and all(result["sharded"].values()), result["sharded"]
    assert result["gathered"].keys() == reference.keys()
    for name, tensor in result["gathered"].items():
        torch.testing.assert_close(tensor, reference[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    start = tiny_dit().state_dict()
    assert max(float((reference[n] - start[n]).abs().max()) for n in reference) > 1e-4  # the EMA moved
    assert result["changed_by_load"] and result["restored_exact"] and result["restored_on_tp_exact"]
    assert result["restored_scalars"] == (DECAY, True, STEPS)
    assert result["restored_state"] == {"step": STEPS, "data_position": STEPS}
    exported = load_file(str(tmp_path / "ema.safetensors"))
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, reference[name], atol=2e-5, rtol=1e-4)
