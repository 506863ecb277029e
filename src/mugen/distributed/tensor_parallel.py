"""Tensor parallel with sequence parallel for MUG-DiT blocks (seed §5.1; Megatron-style TP + SP).

Applied from outside the model with DTensor's ``parallelize_module``; ``model.py`` stays single-device.

Inside a block, each rank of the ``tp`` group owns ``num_heads / tp`` heads of self- and
cross-attention and ``1 / tp`` of the MLP's hidden units:

* column-wise (output features split): ``attn.qkv``, ``cross_attn.q_linear``, ``cross_attn.kv_linear``,
  ``mlp.fc1``; row-wise (input features split, partial sums reduced): ``attn.proj``,
  ``cross_attn.proj``, ``mlp.fc2``.
* Between those regions the activations are sequence-parallel: each rank holds a contiguous
  ``1 / tp`` slice of the ``N + 2`` tokens (start token, video tokens, end token). LayerNorms, the
  per-token adaLN modulation (incl. the t = 0 modulation of the start/end tokens and of clean
  conditioning frames) and the gated residuals run on that slice; the slice is all-gathered before
  each column-wise projection and the row-wise output is reduce-scattered back to slices.
* The 3D RoPE table stays whole (attention sees the whole sequence of its heads); the QK RMSNorm
  over ``head_dim`` works per head, so it runs on the local heads unchanged.
* A sequence whose length does not divide by ``tp`` is padded at the end with zero tokens; the
  padding is left out of the self-attention keys (``attn.attention_op`` is wrapped), cross-attention
  and the MLP are per token, and the padding is dropped after the last block, so it changes nothing.
* With context parallelism (``parallelize_dit`` applies it first, on a (cp, tp) mesh) "the
  sequence" above is this rank's contiguous cp chunk: context parallelism's block pre-hook runs
  first and hands the block the chunk's tokens, RoPE rotations and clean-token mask; the tp slices
  are slices of the chunk; the self-attention of the local heads over the chunk goes to the wrapped
  ``attention_op``, which is then the ring over the cp ranks that hold the same heads; and after
  the last block the slices are gathered into the chunk before the chunks are gathered.

Fused projections: ``qkv`` stores rows as [q | k | v] (and ``kv_linear`` as [k | v]), each part in
head order. A plain column split would hand rank 0 all of q and part of k, so before sharding the
rows are permuted to head-aligned order [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (``_r`` = rank r's heads),
and the layout is recorded in ``model.mugen_fused_rows`` so checkpoints (``distributed/checkpoint.py``)
store and load the canonical [q | k | v] order whatever the TP degree.

Parameters that stay replicated inside a block but only see a rank's share of the work (the adaLN
table, the cross-attention LayerNorm, the QK-norm gains) get a gradient hook that sums their
gradient over the ``tp`` group; so do the replicated adaLN signals entering each block.
Everything outside the blocks (embedders, final layer) runs replicated on the whole sequence: the
sequence is split before the first block and gathered after the last one. Pipeline stages cut
from a tensor-parallel model (``parallelize_dit`` with pp and tp) therefore send each other the
tp slices of the hidden states (1 / tp of the sequence per rank), and only the last stage gathers.

Communication per block and step: 3 all-gathers (self-attention, cross-attention, MLP inputs) and
3 reduce-scatters forward, the mirror image backward, plus small all-reduces of the adaLN signal
and replicated-parameter gradients. Sub-layer inputs and outputs are plain local tensors (lazy
collective results are materialised), so fused kernels inside the block see ordinary tensors.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from mugen.errors import MugenError

FUSED_ROWS_ATTRIBUTE = "mugen_fused_rows"
# Block parameters that are replicated over tp but whose gradient each rank only partly computes.
TP_PARTIAL_GRADIENT_PARAMETERS = (
    "scale_shift_table",  # adaLN table, applied to the rank's tokens
    "cross_attn_norm.weight",  # affine LayerNorm on the rank's tokens
    "cross_attn_norm.bias",
    "attn.q_norm.weight",  # QK-norm gains, applied to the rank's heads
    "attn.k_norm.weight",
    "cross_attn.q_norm.weight",
    "cross_attn.k_norm.weight",
)


@dataclass(frozen=True)
class FusedRows:
    """Rows of a fused projection: ``parts`` blocks ([q|k|v] = 3) permuted to head-aligned order for ``tp`` ranks."""

    parts: int
    tp: int

    def permuted_from_canonical(self, rows: int) -> Tensor:
        """Index p -> canonical row of permuted row p: permuted block (rank, part) holds canonical block (part, rank)."""
        block = rows // (self.parts * self.tp)
        index = torch.arange(rows).view(self.parts, self.tp, block)  # canonical (part, rank, row)
        return index.transpose(0, 1).reshape(rows)  # permuted order (rank, part, row)

    def canonical_runs(self, start: int, length: int, rows: int) -> list[tuple[int, int, int]]:
        """Split permuted rows [start, start + length) into runs (local offset, canonical start, length)."""
        block = rows // (self.parts * self.tp)
        runs = []
        position = start
        while position < start + length:
            block_index, within = divmod(position, block)  # permuted block = rank * parts + part
            rank, part = divmod(block_index, self.parts)
            run = min(block - within, start + length - position)
            runs.append((position - start, (part * self.tp + rank) * block + within, run))
            position += run
        return runs


def canonical_rows(tensor: Tensor, layout: FusedRows) -> Tensor:
    """A whole fused weight/bias (or its gradient, or an AdamW moment) in head-aligned order -> [q | k | v] order."""
    index = layout.permuted_from_canonical(tensor.shape[0]).to(tensor.device)
    canonical = torch.empty_like(tensor)
    canonical[index] = tensor
    return canonical


# ----------------------------------------------------------------------------- sequence split
class _SplitSequence(torch.autograd.Function):
    """Forward: keep this rank's slice of dim 1. Backward: all-gather the slices' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group, rank: int, world: int) -> Tensor:
        ctx.group, ctx.world = group, world
        return x.chunk(world, dim=1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather_dim1(grad.contiguous(), ctx.group, ctx.world), None, None, None


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather the slices along dim 1. Backward: keep this rank's slice of the gradient.

    Everything after the last block runs replicated, so every rank holds the same full gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group, rank: int, world: int) -> Tensor:
        ctx.rank, ctx.world = rank, world
        return _all_gather_dim1(x.contiguous(), group, world)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.chunk(ctx.world, dim=1)[ctx.rank].contiguous(), None, None, None


class _SumGradient(torch.autograd.Function):
    """Forward: identity. Backward: sum the gradient over the group (Megatron's "copy to TP region").

    For replicated inputs that each rank only partly uses (the adaLN signals, used on its tokens).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _sum_over_group(grad, ctx.group), None


def _sum_over_group(grad: Tensor, group) -> Tensor:
    """All-reduce (sum) a gradient in fp32, returned in its own dtype."""
    total = grad.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    dist.all_reduce(total, group=group)
    return total.to(grad.dtype)


def _all_gather_dim1(x: Tensor, group, world: int) -> Tensor:
    pieces = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(pieces, x, group=group)
    return torch.cat(pieces, dim=1)


# ---------------------------------------------------------------------------------- the plan
def block_tensor_parallel_plan() -> dict:
    """The DTensor plan of one ``MUGDiTBlock``, keyed by submodule name.

    Activations arrive as this rank's token slice (B, (N + 2) / tp, d), described as ``Shard(1)``;
    each sub-layer gathers them to the whole sequence and its row-wise output is reduce-scattered
    back to ``Shard(1)``. The gathered input enters the sub-layer as a DTensor, so in backward its
    partial gradients (each rank's heads) are reduce-scattered straight back to token slices.
    """
    return {
        # SelfAttention.forward(x, rope): rope is whole already.
        "attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attn.qkv": ColwiseParallel(),
        "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
        # CrossAttention.forward(x, text, text_attn_mask): the text is replicated.
        "cross_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)),
        "cross_attn.q_linear": ColwiseParallel(),
        "cross_attn.kv_linear": ColwiseParallel(),
        "cross_attn.proj": RowwiseParallel(output_layouts=Shard(1)),
        # fc1 gathers its own input: fused block variants call mlp.fc1 directly, not mlp.
        "mlp.fc1": ColwiseParallel(input_layouts=Shard(1)),
        "mlp.fc2": RowwiseParallel(output_layouts=Shard(1)),
    }


class _Materialize(torch.autograd.Function):
    """Identity that unwraps ``AsyncCollectiveTensor`` (the lazy result of a DTensor collective) in
    both directions, without a copy: fused Triton kernels need tensors with a real storage."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.wait() if isinstance(x, AsyncCollectiveTensor) else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.wait() if isinstance(grad, AsyncCollectiveTensor) else grad


def _materialize_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return _Materialize.apply(output)  # row-wise outputs: reduce-scattered token slices


def _materialize_input_gradient(module: nn.Module, args: tuple) -> tuple:
    return (_Materialize.apply(args[0]), *args[1:])  # gradient of the slice a sub-layer gathers


def _permute_fused_rows(linear: nn.Linear, layout: FusedRows) -> None:
    """Reorder a fused projection's rows from [q | k | v] to head-aligned order, in place."""
    index = layout.permuted_from_canonical(linear.weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            linear.bias.copy_(linear.bias[index])


class _AttendToRealTokens(nn.Module):
    """Self-attention that leaves the padding tokens out of the keys and values (padded query rows get 0).

    Wraps the block's own ``attention_op``; a no-op when the sequence needed no padding.
    """

    def __init__(self, inner: nn.Module, padding: "_SequenceParallelHooks"):
        super().__init__()
        self.inner = inner
        self._padding = [padding]  # a list: not a submodule

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # (B, heads, N_padded, hd)
        real = self._padding[0].real_tokens
        if real is None or real == q.shape[2]:
            return self.inner(q, k, v)
        out = self.inner(q[:, :, :real], k[:, :, :real], v[:, :, :real])  # (B, heads, N + 2, hd)
        return F.pad(out, (0, 0, 0, q.shape[2] - real))


class _SequenceParallelHooks:
    """Block hooks: split the sequence into slices, give the block per-token clean masks, gather at the end."""

    def __init__(self, tp_mesh: DeviceMesh):
        self.group = tp_mesh.get_group()
        self.rank = tp_mesh.get_local_rank()
        self.world = tp_mesh.size()
        self.hooked_parameters: dict[int, weakref.ref] = {}  # id -> the parameter (identity, not ==)
        self.real_tokens: int | None = None  # N + 2 of the current forward, before padding

    def reduce_gradient(self, grad: Tensor) -> Tensor:
        return _sum_over_group(grad, self.group)

    def before_block(self, block: nn.Module, args: tuple) -> tuple:
        x, text, text_attn_mask, t_mod, t0_mod, clean_tokens, rope = args
        tokens = rope.shape[2]  # rope (B, 1, N + 2, hd / 2) always covers the whole sequence
        padding = -tokens % self.world  # tokens appended so that the sequence splits evenly
        # Set on every block: a later pipeline stage starts at a block that gets slices already.
        self.real_tokens = tokens
        if x.shape[1] == tokens:  # the model's first block: split (later blocks get slices)
            x = F.pad(x, (0, 0, 0, padding))  # (B, N + 2 + padding, d), zero tokens at the end
            x = _SplitSequence.apply(x, self.group, self.rank, self.world)
        if clean_tokens is None:
            # The block fixes the start/end tokens in place at positions 0 and -1, which only holds
            # for the whole sequence; per-token masks give the same numbers on any slice.
            clean_tokens = torch.zeros(x.shape[0], tokens, 1, dtype=torch.bool, device=x.device)
            clean_tokens[:, 0] = True
            clean_tokens[:, -1] = True
        if padding:  # the padding tokens: any rotation and modulation (their outputs are dropped)
            rope = torch.cat([rope, rope.new_ones(*rope.shape[:2], padding, rope.shape[3])], dim=2)
            clean_tokens = F.pad(clean_tokens, (0, 0, 0, padding), value=True)
        clean_tokens = clean_tokens.chunk(self.world, dim=1)[self.rank]  # (B, (N + 2 + padding) / tp, 1)
        # The modulation signals (B, 6d) are replicated but modulate only this rank's tokens.
        t_mod = _SumGradient.apply(t_mod, self.group)
        t0_mod = _SumGradient.apply(t0_mod, self.group)
        # FSDP2 has put the gathered weights in place by now (its pre-hook runs first).
        for name in TP_PARTIAL_GRADIENT_PARAMETERS:
            try:
                parameter = block.get_parameter(name)
            except AttributeError:
                continue  # e.g. no QK-norm
            known = self.hooked_parameters.get(id(parameter))
            if parameter.requires_grad and (known is None or known() is not parameter):
                parameter.register_hook(self.reduce_gradient)
                self.hooked_parameters[id(parameter)] = weakref.ref(parameter)
        return (x, text, text_attn_mask, t_mod, t0_mod, clean_tokens, rope)

    def after_last_block(self, block: nn.Module, args: tuple, output: Tensor) -> Tensor:
        full = _GatherSequence.apply(output, self.group, self.rank, self.world)  # (B, N + 2 + padding, d)
        return full[:, : self.real_tokens]


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard every block of ``model`` (a MUGDiT or a pipeline stage holding ``blocks``) over ``tp_mesh``.

    Call before FSDP and activation checkpointing (torchtitan's order: TP, AC, compile, FSDP).
    """
    tp = tp_mesh.size()
    if tp == 1:
        return model
    num_heads = model.config.num_heads
    if num_heads % tp:
        raise MugenError(
            f"tensor parallel: {num_heads} attention heads do not split over tp={tp}; choose tp dividing {num_heads}"
        )
    hidden = int(model.config.hidden_size * model.config.mlp_ratio)
    if hidden % tp:
        raise MugenError(f"tensor parallel: MLP width {hidden} does not split over tp={tp}; choose tp dividing {hidden}")
    if getattr(model, FUSED_ROWS_ATTRIBUTE, None):
        raise MugenError("tensor parallel: this model is already tensor-parallel; apply it once, to a fresh model")
    blocks = list(model.blocks)
    hooks = _SequenceParallelHooks(tp_mesh)
    fused_rows = {}
    plan = block_tensor_parallel_plan()
    for index, block in enumerate(blocks):
        prefix = f"blocks.{index}."
        for name, parts in (("attn.qkv", 3), ("cross_attn.kv_linear", 2)):
            layout = FusedRows(parts=parts, tp=tp)
            _permute_fused_rows(block.get_submodule(name), layout)
            fused_rows[prefix + name + ".weight"] = layout
            fused_rows[prefix + name + ".bias"] = layout
        parallelize_module(block, tp_mesh, plan)
        for name in ("attn.proj", "cross_attn.proj", "mlp.fc2"):
            block.get_submodule(name).register_forward_hook(_materialize_output)
        for name in ("attn", "cross_attn", "mlp.fc1"):  # before their own input hooks gather the slice
            block.get_submodule(name).register_forward_pre_hook(_materialize_input_gradient, prepend=True)
        block.attn.num_heads = num_heads // tp  # local heads; head_dim unchanged
        block.attn.attention_op = _AttendToRealTokens(block.attn.attention_op, hooks)
        block.cross_attn.num_heads = num_heads // tp
        block.register_forward_pre_hook(hooks.before_block)
    # prepend: with context parallelism applied first, the tp slices are gathered into the cp chunk
    # before context parallelism gathers the chunks into the sequence.
    blocks[-1].register_forward_hook(hooks.after_last_block, prepend=True)
    setattr(model, FUSED_ROWS_ATTRIBUTE, fused_rows)
    return model
