"""LoRA fine-tuning of a parallelized MUG-DiT: FSDP2 and tensor parallel (issue 6 item 5, seed §5.1).

Call ``apply_lora`` on the single-device model, then ``parallelize_lora_dit`` instead of
``parallelize_dit``::

    model = MUGDiT(config); load weights ...
    apply_lora(model, rank=16)                       # base frozen, adapters trainable
    model = parallelize_lora_dit(model, mesh, parallel_config)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    ...
    adapters = gathered_lora_state_dict(model)       # collective; load_lora_state_dict on one device

FSDP2 (``tp`` = 1): ``parallelize_dit`` as is. Each block unit shards the frozen base weights and
the adapters alike; only the adapters get gradients and optimizer state.

Tensor parallel (``tp`` > 1). The base layers are sharded by ``tensor_parallel.py``'s plan; the
adapters follow the layer they sit on so that no extra communication is needed in forward:

* column-wise layers (``attn.qkv``, ``cross_attn.q_linear``, ``cross_attn.kv_linear``,
  ``mlp.fc1``; output features split): ``lora_down`` (r, in) replicated; ``lora_up`` (out, r)
  column-wise (rows split like the base's, fused [q|k|v] rows in the same head-aligned order).
  Where the base receives the gathered sequence, ``lora_down`` runs on it and lora_up's
  column-wise style all-reduces its input gradient, so ``lora_down``'s gradient is whole; where
  the base receives the token slice and gathers it itself (``mlp.fc1``), ``lora_down`` runs on
  the slice (gradient summed over tp) and ``lora_up`` gathers the rank-r features.
* row-wise layers (``attn.proj``, ``cross_attn.proj``, ``mlp.fc2``; input features split):
  ``lora_down`` row-wise (its input features split like the base's; the rank-r partial sums are
  reduce-scattered to the rank's token slice, as the base output is), ``lora_up`` replicated and
  applied to the token slice; its gradient is summed over the ``tp`` group.

``parallelize_dit`` applies tensor parallel and FSDP in one call, so with ``tp`` > 1 this function
takes the adapters out, calls ``apply_tensor_parallel``, puts them back and shards them, then runs
the rest of ``parallelize_dit``'s order (recompute, compile, FSDP2) with the same functions.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

from mugen.distributed.activation import apply_activation_checkpointing, compile_blocks
from mugen.distributed.fsdp import apply_fsdp
from mugen.distributed.mesh import MESH_AXES, ParallelConfig, axis_size, data_parallel_mesh
from mugen.distributed.parallelize import parallelize_dit
from mugen.distributed.tensor_parallel import (
    FUSED_ROWS_ATTRIBUTE,
    FusedRows,
    apply_tensor_parallel,
    block_tensor_parallel_plan,
    canonical_rows,
)
from mugen.errors import MugenError
from mugen.models.lora import LoRALinear, lora_layers, replace_submodule

# Block layer suffix -> (tensor-parallel style of the base layer, rows fused from this many parts).
COLUMN_WISE = {"attn.qkv": 3, "cross_attn.q_linear": 1, "cross_attn.kv_linear": 2, "mlp.fc1": 1}
ROW_WISE = ("attn.proj", "cross_attn.proj", "mlp.fc2")


def _block_suffix(name: str) -> str | None:
    """'blocks.3.attn.qkv' -> 'attn.qkv'; None outside the blocks."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    return ".".join(parts[2:])


class _SumOverTensorParallel:
    """Forward pre-hook of a replicated adapter that sees only this rank's tokens: sum its gradient over tp.

    Registered on whatever parameter the module holds at forward time (FSDP2 swaps in unsharded
    parameters), once per parameter object.
    """

    def __init__(self, group):
        self.group = group
        self.hooked: dict[int, weakref.ref] = {}

    def _sum(self, grad: Tensor) -> Tensor:
        total = grad.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=self.group)
        return total.to(grad.dtype)

    def __call__(self, module: nn.Module, args):
        weight = module.weight
        known = self.hooked.get(id(weight))
        if weight.requires_grad and (known is None or known() is not weight):
            weight.register_hook(self._sum)
            self.hooked[id(weight)] = weakref.ref(weight)


def _shard_adapters(model: nn.Module, layers: dict[str, LoRALinear], tp_mesh: DeviceMesh) -> None:
    """Shard each adapter the way its (already tensor-parallel) base layer is sharded; record fused rows."""
    tp = tp_mesh.size()
    plan = block_tensor_parallel_plan()
    fused_rows = dict(getattr(model, FUSED_ROWS_ATTRIBUTE, {}))
    sum_hook = _SumOverTensorParallel(tp_mesh.get_group())
    for name, layer in layers.items():
        suffix = _block_suffix(name)
        for tensor_name in ("weight", "bias"):  # the base's tensors are now under .base
            if f"{name}.{tensor_name}" in fused_rows:
                fused_rows[f"{name}.base.{tensor_name}"] = fused_rows.pop(f"{name}.{tensor_name}")
        if suffix in COLUMN_WISE:
            parts = COLUMN_WISE[suffix]
            if parts > 1:  # lora_up's rows in the base's head-aligned order
                layout = FusedRows(parts=parts, tp=tp)
                index = layout.permuted_from_canonical(layer.lora_up.weight.shape[0])
                with torch.no_grad():
                    layer.lora_up.weight.copy_(layer.lora_up.weight[index])
                fused_rows[f"{name}.lora_up.weight"] = layout
            # The layout the base layer's plan expects its input in: the gathered sequence
            # (Replicate) or this rank's token slice (Shard(1)), which the base gathers itself.
            base_input = plan[suffix].input_layouts[0]
            if base_input == Replicate():
                # A replicated DTensor arrives; lora_down works on its local copy. Its gradient
                # there is whole: lora_up's column-wise style all-reduces its input gradient.
                parallelize_module(
                    layer.lora_down, tp_mesh,
                    PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=True),
                )
                parallelize_module(layer.lora_up, tp_mesh, ColwiseParallel())
            else:
                # The token slice arrives: lora_down runs on it (its gradient is partial: summed over
                # tp), and lora_up gathers the rank-r features, r / d of what gathering x would cost.
                layer.lora_down.register_forward_pre_hook(sum_hook)
                parallelize_module(layer.lora_up, tp_mesh, ColwiseParallel(input_layouts=base_input))
        elif suffix in ROW_WISE:
            # Partial rank-r sums reduce-scattered to this rank's token slice, like the base's output.
            parallelize_module(layer.lora_down, tp_mesh, RowwiseParallel(output_layouts=Shard(1)))
            layer.lora_up.register_forward_pre_hook(sum_hook)
        else:
            raise MugenError(
                f"LoRA with tensor parallel: {name} is not a layer the tensor-parallel plan shards; "
                f"with tp > 1 put adapters on {sorted(COLUMN_WISE) + list(ROW_WISE)} only"
            )
    setattr(model, FUSED_ROWS_ATTRIBUTE, fused_rows)


def parallelize_lora_dit(model: nn.Module, mesh: DeviceMesh, config: ParallelConfig) -> nn.Module:
    """``parallelize_dit`` for a model wrapped by ``apply_lora`` (adapters trainable, base frozen); in place."""
    layers = lora_layers(model)
    if not layers:
        raise MugenError("parallelize_lora_dit: the model has no LoRA adapters; call apply_lora(model) first or use parallelize_dit")
    if config.tp == 1:
        return parallelize_dit(model, mesh, config)
    if config.pp > 1 or config.cp > 1:
        raise MugenError(f"parallelize_lora_dit: LoRA with tp={config.tp} is not combined with pp or cp here; set pp=1 and cp=1")
    config.validate(mesh.size())
    for axis in MESH_AXES:
        if axis_size(mesh, axis) != getattr(config, axis):
            raise MugenError(f"parallelize_lora_dit: the mesh has {axis}={axis_size(mesh, axis)} but the config says {getattr(config, axis)}")
    outside = [name for name in layers if _block_suffix(name) is None]
    if outside:
        raise MugenError(f"LoRA with tensor parallel: adapters outside the blocks ({outside[:3]}) are not supported; target block layers only")
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    for name, layer in layers.items():  # the tensor-parallel plan addresses the plain Linear layers
        replace_submodule(model, name, layer.base)
    apply_tensor_parallel(model, mesh["tp"])
    for name, layer in layers.items():
        layer.base = model.get_submodule(name)  # now holding DTensor shards
        replace_submodule(model, name, layer)
    _shard_adapters(model, layers, mesh["tp"])
    for name, parameter in model.named_parameters():  # sharding made new Parameters (requires_grad=True)
        parameter.requires_grad_(trainable[name])
    apply_activation_checkpointing(model.blocks, config.activation_checkpointing)
    if config.compile_blocks:
        compile_blocks(model.blocks, memory_budget=config.compile_memory_budget)
    dp_mesh = data_parallel_mesh(mesh)
    if dp_mesh is not None:
        apply_fsdp(model, dp_mesh, param_dtype=config.param_dtype, reduce_dtype=config.reduce_dtype, reshard_after_forward=config.reshard_after_forward)
    return model


def gathered_lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters as single-device tensors (``mugen.models.lora.lora_state_dict`` names and row order).

    A collective under FSDP/TP: every rank must call it. Load the result with ``load_lora_state_dict``
    into a single-device model wrapped by ``apply_lora``, then ``merge_lora`` if wanted.
    """
    fused_rows = getattr(model, FUSED_ROWS_ATTRIBUTE, {})
    state = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_down", "lora_up"):
            key = f"{name}.{part}.weight"
            tensor = getattr(layer, part).weight
            tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            tensor = tensor.detach().to("cpu").clone()
            if key in fused_rows:
                tensor = canonical_rows(tensor, fused_rows[key])
            state[key] = tensor
    return state
