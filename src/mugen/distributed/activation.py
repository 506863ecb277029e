"""Activation checkpointing and per-block compilation, applied from outside the model.

The report trained without recomputation (seed §5: memory was handled by parallelism); both are
off by default and exist for sequences or GPUs where the activations do not fit.

* ``full``: each block keeps only its inputs and recomputes its whole forward during backward.
* ``selective``: each block keeps the outputs of its matmuls and attention (the expensive ops) and
  recomputes the cheap ones (LayerNorms, adaLN modulation, GELU, RoPE, residual adds), the
  selective-recomputation policy of Korthikanti et al. 2022 done with torch's op-level
  ``create_selective_checkpoint_contexts``.

Both wrap the block's ``forward`` in place rather than wrapping the module, so parameter names
(and so checkpoints and the official layout) do not change; FSDP2's hooks stay outside the
recomputed region, as in torchtitan.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from mugen.errors import MugenError

# Outputs kept by the selective policy: matrix products and attention, plus the collectives
# tensor parallelism issues inside a block (recomputing them would repeat the communication).
_SAVED_OP_NAMES = (
    "aten.mm",
    "aten.addmm",
    "aten.bmm",
    "aten.baddbmm",
    "aten.linear",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "_c10d_functional.all_gather_into_tensor",
    "_c10d_functional.reduce_scatter_tensor",
    "_c10d_functional.all_reduce",
)


def _existing_ops(names) -> set:
    """The ``.default`` overloads of the named ops that this torch build has."""
    found = set()
    for name in names:
        namespace, op_name = name.split(".")
        packet = getattr(getattr(torch.ops, namespace), op_name, None)
        if packet is not None:
            found.add(packet.default)
    return found


_SAVED_OPS = _existing_ops(_SAVED_OP_NAMES)


def _keep_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_matmul_outputs)


def checkpoint_module_forward(module: nn.Module, mode: str) -> None:
    """Replace ``module.forward`` by a recomputed version ("full" or "selective")."""
    if mode not in ("full", "selective"):
        raise MugenError(f"activation checkpointing: mode {mode!r}; choose 'full' or 'selective'")
    forward = module.forward
    extra = {"context_fn": _selective_context} if mode == "selective" else {}

    @functools.wraps(forward)
    def recomputed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    module.forward = recomputed_forward


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str) -> None:
    """Checkpoint every block of ``blocks`` ("none" leaves them alone)."""
    if mode == "none":
        return
    for block in blocks:
        checkpoint_module_forward(block, mode)


def compile_blocks(blocks: nn.ModuleList, memory_budget: float = 1.0, **compile_kwargs) -> None:
    """``torch.compile`` each block's forward separately (one graph per block, reused by all blocks of a shape).

    Hooks (FSDP2, sequence-parallel splitting) stay outside the compiled region. ``memory_budget`` < 1 sets
    torch's ``activation_memory_budget`` (a process-wide setting of the forward/backward partitioner, read when a
    block is first compiled): the partitioner then recomputes cheap ops in the backward so that the activations it
    keeps fit that share of what it keeps by default (1B preset on an H100, benchmarks/results/fa4_attention.md:
    0.8 kept 33.2 GiB instead of 51.9 at 1.5% more step time).
    """
    if memory_budget < 1.0:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = memory_budget
    for block in blocks:
        block.forward = torch.compile(block.forward, **compile_kwargs)
