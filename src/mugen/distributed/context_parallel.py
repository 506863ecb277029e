"""Context parallelism for MUG-DiT: one sample's token sequence split over a process group (seed §5.1).

Long videos (50k-600k tokens) do not fit one GPU's activations, so the context group splits the
sequence ``[start, video tokens (T, H, W), end]`` into equal contiguous chunks, one per rank. Every
per-token tensor is split the same way: the hidden states, the 3D RoPE rotations (so each token
keeps the rotation of its global position, start and end tokens included) and the per-token
clean-token mask that picks the t = 0 modulation for conditioned frames and the two boundary tokens.
Everything in a block but self-attention is per token, so it runs on the local chunk unchanged;
cross-attention needs only the local queries (the text is replicated); self-attention sees the
whole sequence through ring attention over the group. After the last block the chunks are gathered
again, so the final layer, unpatchify and the loss run on the full sequence, identically on every
rank of the group.

Contiguous chunks are already balanced: self-attention here is bidirectional, so every query
attends to every key and each rank does the same work (the zig-zag layout only helps causal masks).

Pipeline stages cut from a context-parallel model (``parallelize_dit`` with pp and cp) send each
other the chunks: only the model's first block splits the sequence and only its last gathers it.

When ``N + 2`` is not divisible by the group size the sequence is padded at its end; padded keys
are left out of attention and padded queries are dropped at the gather, so the result is exactly
the unpadded one.

Gradients: the gather's backward sums the output gradients of the group, so the sum over the
group of every rank's gradients is ``group size x`` the gradient of the (replicated) loss. Average
the gradients over the context group, as for data parallelism (``average_gradients``, or FSDP/DDP
over a mesh dimension that includes the context axis, as torchtitan's ``dp_shard_cp``). Every
rank of a context group must see the same batch, noise and timesteps: seed the noise generator
with the data-parallel rank (``parallelize.data_parallel_rank``), never with the global rank.

Usage::

    model = MUGDiT(config)
    handle = apply_context_parallel(model, cp_mesh)      # 1-D DeviceMesh or ProcessGroup
    loss = task.compute_loss(model, batch, generator).loss
    loss.backward()
    average_gradients(model, cp_mesh)                    # unless FSDP/DDP over the CP axis does it
    handle.remove()                                      # back to the single-device model
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mugen.errors import MugenError
from mugen.models.dit.model import MUGDiT, SelfAttention

ATTENTION_KINDS = ("ring", "allgather")


# ----------------------------------------------------------------------------------- the layout
@dataclass
class SequenceLayout:
    """How a sequence of ``length`` tokens is split into ``world`` equal chunks (the last padded)."""

    length: int  # N + 2 real tokens
    world: int

    @property
    def chunk(self) -> int:
        return -(-self.length // self.world)  # ceil

    @property
    def padded_length(self) -> int:
        return self.chunk * self.world

    def valid_tokens(self, rank: int) -> int:
        """Real (not padding) tokens in ``rank``'s chunk."""
        return max(0, min(self.chunk, self.length - rank * self.chunk))


@dataclass
class _ContextState:
    """The group and the layout of the sequence in flight (set by each block's pre-hook)."""

    group: dist.ProcessGroup
    rank: int
    world: int
    layout: SequenceLayout | None = None
    # Shards of the full per-token tensors of the forward in flight, keyed by the full tensor's id;
    # the full tensors are kept so that an id is not reused while its entry lives.
    shards: dict[int, tuple[Tensor, tuple[Tensor, Tensor]]] = field(default_factory=dict)

    def peer(self, offset: int) -> int:
        """Global rank of the group member ``offset`` places after this one (ring order)."""
        return dist.get_global_rank(self.group, (self.rank + offset) % self.world)


def process_group_of(mesh_or_group, what: str) -> dist.ProcessGroup:
    """The process group of a 1-D DeviceMesh (or the group itself); ``what`` names the caller in errors."""
    if isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group
    if hasattr(mesh_or_group, "get_group"):  # DeviceMesh
        if mesh_or_group.ndim != 1:
            raise MugenError(
                f"{what}: the mesh has {mesh_or_group.ndim} dimensions; pass its 1-D axis, e.g. mesh['cp'] or mesh['pp']"
            )
        return mesh_or_group.get_group()
    raise MugenError(f"{what}: expected a 1-D DeviceMesh or a ProcessGroup, got {type(mesh_or_group).__name__}")


def shard_sequence(tensor: Tensor, dim: int, layout: SequenceLayout, rank: int, pad_value=0) -> Tensor:
    """``rank``'s chunk of a full-length tensor along ``dim`` (padded at the end when needed)."""
    if tensor.shape[dim] != layout.length:
        raise ValueError(f"tensor has {tensor.shape[dim]} tokens along dim {dim}, expected {layout.length}")
    extra = layout.padded_length - layout.length
    if extra:
        pad_shape = list(tensor.shape)
        pad_shape[dim] = extra
        tensor = torch.cat([tensor, torch.full(pad_shape, pad_value, dtype=tensor.dtype, device=tensor.device)], dim)
    return tensor.narrow(dim, rank * layout.chunk, layout.chunk)


class _GatherSequence(torch.autograd.Function):
    """All-gather chunks along ``dim`` into the full (unpadded) sequence.

    Backward: the gradient of the gathered tensor is summed over the group, then each rank keeps its
    chunk (a reduce-scatter, written as all-reduce + slice because gloo has no reduce-scatter).
    """

    @staticmethod
    def forward(ctx, local: Tensor, dim: int, state: _ContextState, layout: SequenceLayout) -> Tensor:
        ctx.dim, ctx.state, ctx.layout = dim, state, layout
        local = local.contiguous()
        chunks = [torch.empty_like(local) for _ in range(state.world)]
        dist.all_gather(chunks, local, group=state.group)
        return torch.cat(chunks, dim).narrow(dim, 0, layout.length)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.state.group)
        return shard_sequence(grad, ctx.dim, ctx.layout, ctx.state.rank).contiguous(), None, None, None


def gather_sequence(local: Tensor, dim: int, state: _ContextState, layout: SequenceLayout) -> Tensor:
    """Differentiable all-gather of the chunks of ``layout`` along ``dim`` (padding dropped)."""
    return _GatherSequence.apply(local, dim, state, layout)


# ------------------------------------------------------------------------------ ring attention
# One chunk of attention: the queries of this rank against the keys/values of one chunk, returning
# the partial output and its log-sum-exp (B, H, n) so that partial results merge exactly; and the
# chunk's gradients given the *final* output and log-sum-exp (then the chunk's softmax weights are
# the final ones, restricted to its keys). Kernels: "fused" uses PyTorch's flash-attention
# operators (CPU: any float dtype; CUDA: fp16/bf16, fp32 falls back to math), "math" is plain fp32
# matmuls (memory n x m per head: fine for tests, not for long sequences).
RING_KERNELS = ("fused", "math")
aten = torch.ops.aten


def _kernel_for(q: Tensor, kernel: str) -> str:
    if kernel == "math":
        return "math"
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        return "cuda"
    return "math"


def _chunk_attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, kernel: str):
    """(out (B, H, n, D), log-sum-exp (B, H, n) fp32, kernel metadata) of q against one key chunk."""
    if kernel == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse.float(), None
    if kernel == "cuda":
        out, lse, cum_q, cum_k, max_q, _, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale
        )
        return out, lse.float(), (cum_q, cum_k, max_q, seed, offset)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, n, m)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, n)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()), lse, None


def _chunk_attention_backward(
    q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, out: Tensor, lse: Tensor, scale: float, kernel: str, meta
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad q, grad k, grad v) through one key chunk, given the final output and log-sum-exp."""
    if kernel == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, scale=scale
        )
    if kernel == "cuda":
        cum_q, cum_k, max_q, seed, offset = meta
        return aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, k.shape[2], 0.0, False, seed, offset, scale=scale
        )
    q32, k32, grad32 = q.float(), k.float(), grad_out.float()
    delta = (grad32 * out.float()).sum(-1)  # (B, H, n): rowsum(dO * O)
    probs = torch.exp(torch.matmul(q32, k32.transpose(-1, -2)) * scale - lse[..., None])  # (B, H, n, m)
    grad_v = torch.matmul(probs.transpose(-1, -2), grad32)  # (B, H, m, D)
    grad_scores = probs * (torch.matmul(grad32, v.float().transpose(-1, -2)) - delta[..., None]) * scale
    return torch.matmul(grad_scores, k32), torch.matmul(grad_scores.transpose(-1, -2), q32), grad_v


def _pass_along(tensors: list[Tensor], state: _ContextState) -> tuple[list[Tensor], list]:
    """Start sending ``tensors`` to the next rank and receiving the previous rank's; returns (buffers, requests)."""
    received = [torch.empty_like(tensor) for tensor in tensors]
    operations = [dist.P2POp(dist.isend, tensor, state.peer(1), state.group) for tensor in tensors]
    operations += [dist.P2POp(dist.irecv, buffer, state.peer(-1), state.group) for buffer in received]
    return received, dist.batch_isend_irecv(operations)


class _RingAttention(torch.autograd.Function):
    """Bidirectional attention of the local queries over the keys of the whole group.

    Forward: the K/V chunks travel once around the ring (each rank sends to the next and receives
    from the previous while it computes on the chunk it holds); the partial results are merged with
    their log-sum-exp (online softmax). Backward: the K/V chunks travel around again, each with the
    fp32 gradient accumulators of its keys and values, which collect every rank's contribution and
    arrive back at their owner after a full turn. Padded keys (the end of the last chunks) are skipped.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, state: _ContextState, layout: SequenceLayout, kernel: str):
        with torch.autocast(q.device.type, enabled=False):  # the kernels pick their own precision
            return _RingAttention._forward(ctx, q, k, v, state, layout, kernel)

    @staticmethod
    def _forward(ctx, q: Tensor, k: Tensor, v: Tensor, state: _ContextState, layout: SequenceLayout, kernel: str):
        kernel = _kernel_for(q, kernel)
        scale = q.shape[-1] ** -0.5
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # (B, H, n, D)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)  # (B, H, n)
        key, value, meta = k.contiguous(), v.contiguous(), None
        for step in range(state.world):
            source = (state.rank - step) % state.world  # the rank whose chunk we hold now
            requests = []
            if step < state.world - 1:
                (next_key, next_value), requests = _pass_along([key, value], state)
            valid = layout.valid_tokens(source)
            if valid:
                chunk_out, chunk_lse, chunk_meta = _chunk_attention_forward(
                    q, key[:, :, :valid], value[:, :, :valid], scale, kernel
                )
                meta = meta or chunk_meta
                merged_lse = torch.logaddexp(lse, chunk_lse)
                out = out * torch.exp(lse - merged_lse)[..., None] + chunk_out.float() * torch.exp(chunk_lse - merged_lse)[..., None]
                lse = merged_lse
            for request in requests:
                request.wait()
            if requests:
                key, value = next_key, next_value
        out = out.to(q.dtype)
        ctx.state, ctx.layout, ctx.kernel, ctx.scale, ctx.meta = state, layout, kernel, scale, meta
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _RingAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        state, layout = ctx.state, ctx.layout
        grad_out = grad_out.to(q.dtype).contiguous()
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        key, value = k.contiguous(), v.contiguous()
        grad_key = torch.zeros(k.shape, dtype=torch.float32, device=k.device)  # travels with ``key``
        grad_value = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for step in range(state.world):
            source = (state.rank - step) % state.world
            kv_requests = []
            if step < state.world - 1:
                (next_key, next_value), kv_requests = _pass_along([key, value], state)
            valid = layout.valid_tokens(source)
            if valid:
                chunk_q, chunk_k, chunk_v = _chunk_attention_backward(
                    q, key[:, :, :valid], value[:, :, :valid], grad_out, out, lse, ctx.scale, ctx.kernel, ctx.meta
                )
                grad_q += chunk_q
                grad_key[:, :, :valid] += chunk_k
                grad_value[:, :, :valid] += chunk_v
            # The accumulators of chunk ``source`` move on with it; after the last step they reach their owner.
            (grad_key, grad_value), grad_requests = _pass_along([grad_key, grad_value], state)
            for request in kv_requests + grad_requests:
                request.wait()
            if kv_requests:
                key, value = next_key, next_value
        return grad_q.to(q.dtype), grad_key.to(k.dtype), grad_value.to(v.dtype), None, None, None


class RingAttention(nn.Module):
    """Parameter-free ``attention_op``: ring attention over the context group; (B, H, n, D) local chunks."""

    def __init__(self, state: _ContextState, kernel: str = "fused"):
        super().__init__()
        self.state, self.kernel = state, kernel

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _RingAttention.apply(q, k, v, self.state, _current_layout(self.state, q), self.kernel)


class AllGatherKVAttention(nn.Module):
    """Parameter-free ``attention_op``: gather the whole K and V, attend with the local queries.

    Simpler than the ring and uses the device's fused SDPA kernel, but holds the full K/V of the
    sequence per layer (saved for backward); the ring holds one chunk at a time.
    """

    def __init__(self, state: _ContextState):
        super().__init__()
        self.state = state

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        layout = _current_layout(self.state, q)
        full_k = gather_sequence(k, 2, self.state, layout)  # (B, H, N + 2, D), padding dropped
        full_v = gather_sequence(v, 2, self.state, layout)
        return F.scaled_dot_product_attention(q, full_k, full_v)


def _current_layout(state: _ContextState, q: Tensor) -> SequenceLayout:
    """The layout set by the running block's pre-hook; checked against the local chunk it gets."""
    layout = state.layout
    if layout is None or q.shape[2] != layout.chunk:
        raise RuntimeError(
            f"context parallel: attention got {q.shape[2]} local tokens but the sequence in flight has chunks of "
            f"{None if layout is None else layout.chunk}; run each forward's backward before the next forward "
            "when blocks are recomputed"
        )
    return layout


# ------------------------------------------------------------------------------- applying it
@dataclass
class ContextParallelHandle:
    """What ``apply_context_parallel`` changed; ``remove()`` restores the single-device model."""

    model: nn.Module
    state: _ContextState
    hooks: list
    replaced_ops: list  # (attention module, previous attention_op)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for attention, previous in self.replaced_ops:
            attention.attention_op = previous
        self.hooks, self.replaced_ops = [], []


def _block_pre_hook(state: _ContextState, is_first: bool):
    """Shard x (first block only), the RoPE rotations and the clean-token mask of a block's inputs."""

    def hook(module, args, kwargs):
        x, text, text_attn_mask, t_mod, t0_mod, clean_tokens, rope = _block_inputs(args, kwargs)
        # The rotations always come full length, (B, 1, N + 2, D/2); the layout of this block's
        # attention follows from them (also when activation checkpointing re-runs the block later).
        layout = state.layout = SequenceLayout(rope.shape[2], state.world)
        if is_first:
            state.shards = {}
            if x.shape[1] != layout.length:
                raise ValueError(f"first block got {x.shape[1]} tokens but {layout.length} RoPE positions")
            x = shard_sequence(x, 1, layout, state.rank)  # (B, chunk, d)
        key = id(rope)
        if key not in state.shards or state.shards[key][0] is not rope:
            state.shards = {}  # a new forward (also on a pipeline stage that starts past block 0)
            if clean_tokens is None:
                # The model fixes the two boundary tokens in place when no frame is conditioned; on a
                # chunk they are not at its ends, so spell the mask out: start and end take t = 0.
                clean_tokens = torch.zeros(x.shape[0], layout.length, 1, dtype=torch.bool, device=x.device)
                clean_tokens[:, 0] = True
                clean_tokens[:, -1] = True
            local_rope = shard_sequence(rope, 2, layout, state.rank, pad_value=1)  # (B, 1, chunk, D/2)
            local_clean = shard_sequence(clean_tokens, 1, layout, state.rank, pad_value=True)  # (B, chunk, 1)
            state.shards[key] = (rope, (local_clean, local_rope))
        local_clean, local_rope = state.shards[key][1]
        return (x, text, text_attn_mask, t_mod, t0_mod, local_clean, local_rope), {}

    return hook


_BLOCK_ARGUMENTS = ("x", "text", "text_attn_mask", "t_mod", "t0_mod", "clean_tokens", "rope")


def _block_inputs(args: tuple, kwargs: dict) -> tuple:
    values = list(args) + [kwargs[name] for name in _BLOCK_ARGUMENTS[len(args) :]]
    if len(values) != len(_BLOCK_ARGUMENTS):
        raise RuntimeError(f"context parallel: a MUG-DiT block takes {_BLOCK_ARGUMENTS}, got {len(values)} inputs")
    return tuple(values)


def _last_block_hook(state: _ContextState):
    def hook(module, args, kwargs, output):
        full = gather_sequence(output, 1, state, state.layout)  # (B, N + 2, d)
        state.shards = {}
        return full

    return hook


def apply_context_parallel(
    model: MUGDiT, cp_mesh, attention: str = "ring", ring_kernel: str = "fused"
) -> ContextParallelHandle:
    """Split MUG-DiT's token sequence over ``cp_mesh`` (1-D DeviceMesh or ProcessGroup), in place.

    ``attention``: ``"ring"`` (default: K/V chunks passed around the ring, one chunk in memory at a
    time) or ``"allgather"`` (gather all K/V, then the device's SDPA kernel). ``ring_kernel``:
    ``"fused"`` (PyTorch's flash-attention operators per chunk where they exist: CPU, CUDA fp16/bf16)
    or ``"math"`` (fp32 matmuls). The model's parameter names and state dict are unchanged. Returns a
    handle whose ``remove()`` undoes it. Gradients must then be averaged over the group (see the
    module docstring).
    """
    if attention not in ATTENTION_KINDS:
        raise MugenError(f"context parallel: attention={attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
    if ring_kernel not in RING_KERNELS:
        raise MugenError(f"context parallel: ring_kernel={ring_kernel!r}; choose one of {', '.join(RING_KERNELS)}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise MugenError("context parallel: the model has no transformer blocks (model.blocks); pass a MUGDiT")
    group = process_group_of(cp_mesh, "context parallel")
    state = _ContextState(group=group, rank=dist.get_rank(group), world=dist.get_world_size(group))
    replaced = []
    for module in model.modules():
        if isinstance(module, SelfAttention):
            if not hasattr(module, "attention_op"):
                raise MugenError(
                    "context parallel: SelfAttention has no replaceable attention_op; this mugen version's "
                    "model is too old for context parallelism"
                )
            replaced.append((module, module.attention_op))
            module.attention_op = RingAttention(state, ring_kernel) if attention == "ring" else AllGatherKVAttention(state)
    hooks = [
        block.register_forward_pre_hook(_block_pre_hook(state, index == 0), with_kwargs=True)
        for index, block in enumerate(blocks)
    ]
    hooks.append(blocks[-1].register_forward_hook(_last_block_hook(state), with_kwargs=True))
    return ContextParallelHandle(model=model, state=state, hooks=hooks, replaced_ops=replaced)


def average_gradients(model: nn.Module, cp_mesh) -> None:
    """Average every parameter gradient over the context group (one flat all-reduce)."""
    group = process_group_of(cp_mesh, "context parallel")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
