"""LoRA fine-tuning under FSDP2, under tensor parallel (issue 6 item 5), 2 gloo processes, and under both (4).

Three AdamW steps on the adapters of a tiny MUG-DiT with dp_shard=2 and with tp=2 must match the
single-process run (losses, adapter gradients, adapter weights) within fp32 tolerance; the base
stays frozen and sharded; merging the gathered adapters gives the unmerged forward.
"""

from __future__ import annotations

import torch
from launcher import run_distributed
from parallel_training import GLOBAL_BATCH, batch_loss, full_value, step_batch, tiny_dit
from torch.distributed.tensor import DTensor

from mugen.distributed.lora import gathered_lora_state_dict, parallelize_lora_dit
from mugen.distributed.mesh import ParallelConfig, build_mesh
from mugen.distributed.parallelize import data_parallel_rank
from mugen.distributed.tensor_parallel import FUSED_ROWS_ATTRIBUTE
from mugen.models.lora import apply_lora, load_lora_state_dict, lora_layers, lora_state_dict, merge_lora

STEPS = 3
LORA_LR = 1e-2
LOSS_RTOL, WEIGHT_ATOL, GRAD_RTOL = 1e-5, 2e-5, 1e-4


def tiny_lora_dit():
    model = tiny_dit()
    apply_lora(model, rank=4, alpha=8.0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # lora_up starts at zero, which would leave lora_down without gradient
        for layer in lora_layers(model).values():
            layer.lora_up.weight.add_(0.05 * torch.randn(layer.lora_up.weight.shape, generator=generator))
    return model


def adapter_names(model):
    return [name for name, p in model.named_parameters() if p.requires_grad]


def single_process_run():
    model = tiny_lora_dit()
    names = adapter_names(model)
    parameters = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([parameters[n] for n in names], lr=LORA_LR)
    losses, grads = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = batch_loss(model, step_batch(step), 0, GLOBAL_BATCH)
        loss.backward()
        grads.append({n: parameters[n].grad.clone() for n in names})
        optimizer.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "grads": grads, "adapters": lora_state_dict(model), "base": {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}}


def parallel_lora_run(rank, world_size):
    results = {}
    for label, layout in (("fsdp", {"dp_shard": 2}), ("tp", {"tp": 2})):
        config = ParallelConfig(param_dtype="fp32", **layout)
        mesh = build_mesh(config, device_type="cpu")
        model = parallelize_lora_dit(tiny_lora_dit(), mesh, config)
        names = adapter_names(model)
        parameters = dict(model.named_parameters())
        frozen = {n: (isinstance(p, DTensor), p.requires_grad) for n, p in parameters.items() if n not in names}
        optimizer = torch.optim.AdamW([parameters[n] for n in names], lr=LORA_LR)
        dp_index, dp_count = data_parallel_rank(mesh)
        share = GLOBAL_BATCH // dp_count
        fused_rows = getattr(model, FUSED_ROWS_ATTRIBUTE, {})
        losses, grads = [], []
        for step in range(STEPS):
            optimizer.zero_grad()
            loss = batch_loss(model, step_batch(step), dp_index * share, (dp_index + 1) * share)
            loss.backward()
            grads.append({n: full_value(parameters[n].grad, n, fused_rows) for n in names})
            optimizer.step()
            total = loss.detach().clone()
            torch.distributed.all_reduce(total)
            losses.append(float(total) / world_size)
        base = {n: full_value(p, n, fused_rows) for n, p in parameters.items() if n not in names}
        placements = {n: tuple(str(x) for x in p.placements) if isinstance(p, DTensor) else None for n, p in parameters.items() if n in names}
        results[label] = {"names": names, "frozen": frozen, "placements": placements, "losses": losses, "grads": grads, "adapters": gathered_lora_state_dict(model), "base": base}
    return results if rank == 0 else None


def test_lora_under_fsdp_and_tp_matches_single_process_and_merges():
    reference = single_process_run()
    results = run_distributed(parallel_lora_run, 2)[0]
    for label, run in results.items():
        assert sorted(run["names"]) == sorted(reference["grads"][0]), label
        assert all(".lora_down." in n or ".lora_up." in n for n in run["names"])
        assert all(not requires_grad for _, requires_grad in run["frozen"].values()), label  # base frozen
        assert all(is_sharded for name, (is_sharded, _) in run["frozen"].items() if ".base." in name), label  # and sharded
        if label == "tp":  # the adapters follow their base layer: column-wise B split on rows, row-wise A on columns
            placements = run["placements"]
            assert placements["blocks.0.attn.qkv.lora_up.weight"] == ("S(0)",)
            assert placements["blocks.0.attn.qkv.lora_down.weight"] is None  # replicated
            assert placements["blocks.0.mlp.fc2.lora_down.weight"] == ("S(1)",)
            assert placements["blocks.0.mlp.fc2.lora_up.weight"] is None
        torch.testing.assert_close(run["losses"], reference["losses"], rtol=LOSS_RTOL, atol=0, msg=lambda m: f"{label}: {m}")
        for step in range(STEPS):
            for name, grad in run["grads"][step].items():
                expected = reference["grads"][step][name]
                assert float(expected.abs().max()) > 0
                torch.testing.assert_close(grad, expected, rtol=GRAD_RTOL, atol=GRAD_RTOL * float(expected.abs().max()), msg=lambda m: f"{label} step {step} {name}: {m}")
        assert run["adapters"].keys() == reference["adapters"].keys()
        for name, tensor in run["adapters"].items():
            torch.testing.assert_close(tensor, reference["adapters"][name], atol=WEIGHT_ATOL, rtol=1e-4, msg=lambda m: f"{label} {name}: {m}")
        for name, tensor in run["base"].items():  # frozen: still the initial weights, in single-device order
            torch.testing.assert_close(tensor, reference["base"][name], atol=0, rtol=0, msg=lambda m: f"{label} {name}: {m}")

    model = tiny_lora_dit()  # the gathered TP adapters, merged into the base, give the unmerged forward
    load_lora_state_dict(model, results["tp"]["adapters"])
    batch = step_batch(0)
    with torch.no_grad():
        unmerged = batch_loss(model, batch, 0, GLOBAL_BATCH)
        merge_lora(model)
        assert not lora_layers(model)
        merged = batch_loss(model, batch, 0, GLOBAL_BATCH)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-7)
    assert abs(float(unmerged) - reference["losses"][0]) > 1e-6  # trained adapters change the output


def fsdp_by_tp_lora_run(rank, world_size):
    config = ParallelConfig(param_dtype="fp32", dp_shard=2, tp=2)
    mesh = build_mesh(config, device_type="cpu")
    model = parallelize_lora_dit(tiny_lora_dit(), mesh, config)
    parameters = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([parameters[n] for n in adapter_names(model)], lr=LORA_LR)
    dp_index, dp_count = data_parallel_rank(mesh)
    share = GLOBAL_BATCH // dp_count
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = batch_loss(model, step_batch(step), dp_index * share, (dp_index + 1) * share)
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)  # every tp rank holds its dp group's loss
        losses.append(float(total) / world_size)
    adapters = gathered_lora_state_dict(model)  # a collective: every rank calls it
    return {"losses": losses, "adapters": adapters} if rank == 0 else None


def test_lora_under_fsdp_by_tp_matches_single_process():
    """The 2D layout (dp_shard=2 x tp=2, 4 processes): FSDP2 shards the tensor-parallel adapters too."""
    reference = single_process_run()
    result = run_distributed(fsdp_by_tp_lora_run, 4)[0]
    torch.testing.assert_close(result["losses"], reference["losses"], rtol=LOSS_RTOL, atol=0)
    for name, tensor in result["adapters"].items():
        torch.testing.assert_close(tensor, reference["adapters"][name], atol=WEIGHT_ATOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")
