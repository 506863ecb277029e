"""``parallelize_dit``: lay a single-device MUG-DiT over a 5D device mesh (seed §5.1).

Order: context parallel, tensor + sequence parallel, activation checkpointing, per-block compile,
then FSDP2 / HSDP over the data-parallel (and context-parallel) ranks. With cp and tp together,
each cp rank holds a contiguous chunk of the token sequence and the tp ranks of that chunk split
it again into slices (sequence parallel) and split the attention heads; self-attention of the
local heads runs as a ring over the cp ranks that hold the same heads. With pp > 1 the cp/tp
model is then cut into pipeline stages (``distributed/pipeline.py``) and FSDP2 shards each stage
over the data-parallel (and cp) ranks that hold it.

Typical use, one process per GPU under ``torchrun``::

    config = ParallelConfig(dp_shard=8, tp=2)
    mesh = build_mesh(config)                          # 16 ranks
    with torch.device("meta"):
        model = MUGDiT(dit_config("10B"))
    model = parallelize_dit(model, mesh, config)
    initialize_from_single_device(model, lambda: MUGDiT(dit_config("10B")), "cuda")  # distributed/checkpoint.py
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss.backward(); clip_grad_norm_(model.parameters(), 1.0); optimizer.step()

(``clip_grad_norm_`` here, not torch's: gradients are DTensors on several meshes.)

Every rank of one ``tp`` (or ``cp``) group must see the same batch, flow times and noise; ranks of
different data-parallel groups see different samples (``data_parallel_rank``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from mugen.distributed.activation import apply_activation_checkpointing, compile_blocks
from mugen.distributed.fsdp import apply_fsdp
from mugen.distributed.mesh import MESH_AXES, ParallelConfig, axis_size, data_parallel_mesh
from mugen.distributed.tensor_parallel import FUSED_ROWS_ATTRIBUTE, apply_tensor_parallel
from mugen.errors import MugenError


def parallelize_dit(model: nn.Module, mesh: DeviceMesh, config: ParallelConfig) -> nn.Module:
    """Apply ``config`` to ``model`` (a MUGDiT with the same weights on every rank, or on the meta device) in place.

    With ``pp`` > 1 returns the pipeline wrapper of ``distributed/pipeline.py`` instead: this rank's
    stages, their blocks context/tensor-parallel when ``cp``/``tp`` > 1, sharded with FSDP2 over the
    data-parallel (and cp) ranks when ``dp_shard``/``dp_replicate``/``cp`` > 1.
    """
    config.validate(mesh.size())
    missing = [axis for axis in MESH_AXES if axis not in (mesh.mesh_dim_names or ())]
    if missing:
        raise MugenError(f"parallelize_dit: the mesh lacks axes {missing}; build it with build_mesh(config)")
    for axis in MESH_AXES:
        if axis_size(mesh, axis) != getattr(config, axis):
            raise MugenError(
                f"parallelize_dit: the mesh has {axis}={axis_size(mesh, axis)} but the config says "
                f"{getattr(config, axis)}; build the mesh from the same config (build_mesh(config))"
            )
    if config.pp > 1:
        return _pipeline(model, mesh, config)

    if config.cp > 1:
        # Context parallel first: its block hooks cut the sequence into cp chunks (and its ring
        # replaces self-attention's attention_op), then tensor parallel works inside each chunk
        # (its hooks and its padding wrapper around the ring come second, see tensor_parallel.py).
        from mugen.distributed.context_parallel import apply_context_parallel

        apply_context_parallel(model, mesh["cp"])
    if config.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    apply_activation_checkpointing(model.blocks, config.activation_checkpointing)
    if config.compile_blocks:
        compile_blocks(model.blocks, memory_budget=config.compile_memory_budget)
    dp_mesh = data_parallel_mesh(mesh)
    if dp_mesh is not None:
        apply_fsdp(
            model,
            dp_mesh,
            param_dtype=config.param_dtype,
            reduce_dtype=config.reduce_dtype,
            reshard_after_forward=config.reshard_after_forward,
        )
    return model


def _pipeline(model: nn.Module, mesh: DeviceMesh, config: ParallelConfig):
    """Pipeline stages over ``pp`` whose blocks are context/tensor-parallel over ``cp``/``tp``, each
    stage sharded with FSDP2 over the data-parallel (and cp) ranks that hold the same stage."""
    from mugen.distributed.pipeline import PipelinedDiT

    # Context and tensor parallelism, recomputation and compilation change each block in place, so
    # the stages cut below inherit them (the stages send each other cp chunks / tp slices); each
    # stage carries the fused-row layout of its own parameters.
    if config.cp > 1:
        from mugen.distributed.context_parallel import apply_context_parallel

        apply_context_parallel(model, mesh["cp"])
    if config.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    apply_activation_checkpointing(model.blocks, config.activation_checkpointing)
    if config.compile_blocks:
        compile_blocks(model.blocks, memory_budget=config.compile_memory_budget)
    pipe = PipelinedDiT(model, mesh["pp"], n_microbatches=config.pp_microbatches, schedule=config.pp_schedule)
    fused_rows = getattr(model, FUSED_ROWS_ATTRIBUTE, {})
    for stage in pipe.stages:
        names = set(stage.state_dict())
        setattr(stage, FUSED_ROWS_ATTRIBUTE, {name: layout for name, layout in fused_rows.items() if name in names})
    dp_mesh = data_parallel_mesh(mesh)
    if dp_mesh is not None:
        pipe.shard_data_parallel(
            dp_mesh,
            param_dtype=config.param_dtype,
            reduce_dtype=config.reduce_dtype,
            reshard_after_forward=config.reshard_after_forward,
        )
    return pipe


def data_parallel_rank(mesh: DeviceMesh) -> tuple[int, int]:
    """(index, count) of this rank's data-parallel group: ranks with the same index see the same samples."""
    replicate, shard = mesh["dp_replicate"], mesh["dp_shard"]
    return replicate.get_local_rank() * shard.size() + shard.get_local_rank(), replicate.size() * shard.size()


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> Tensor:
    """Clip the global gradient norm of parameters that may be DTensors on different meshes; returns the norm.

    Gradients are grouped by (mesh, placements) and each group's norm is taken with DTensor ops, so
    shards are summed once and replicas are not counted twice. ``max_norm`` <= 0 only measures.
    """
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    groups: dict[tuple, list[Tensor]] = {}
    for grad in grads:
        key = (grad.device_mesh, tuple(grad.placements)) if isinstance(grad, DTensor) else (None, None)
        groups.setdefault(key, []).append(grad)
    squared = 0.0
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared += float(norm) ** 2
    total = math.sqrt(squared)
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for grad in grads:
            grad.mul_(scale)
    return torch.tensor(total)
