"""Pipeline parallelism for MUG-DiT with ``torch.distributed.pipelining`` (seed §5.1).

The network is cut into stages along its depth: the first stage holds the embedders (patch, time,
fps, text, start/end tokens) and the first blocks, the middle stages hold blocks, the last stage
holds the last blocks, the final layer and the flow loss. Each pipeline rank keeps only its stages'
parameters (with their original names, so state dicts and checkpoints line up with the
single-device model), and a schedule (1F1B, GPipe, or interleaved 1F1B with several stages per
rank) runs the micro-batches of one step through them.

Between stages travel the hidden states (B, N + 2, d), the embedded text (B, L, d) and the four
global modulation signals (t and t = 0, before and after ``t_block``). Everything without
parameters (3D RoPE rotations, the clean-token mask of conditioned frames, the text attention mask)
is rebuilt on every stage from the step's inputs, which every rank receives: the batch, and the
flow times and noise, which every rank of the pipeline draws from a generator seeded the same way
(with the data-parallel rank at most, never the pipeline rank). ``PipelinedDiT.flow_step`` checks
that the ranks agree on them.

Shapes: micro-batches of one step share a shape; a new step may bring another (shape-bucketed
data, variable sequence length). Pipeline stages fix their activation shapes when they first run,
so stages and schedule are built once per input shape and cached. On torch 2.13 the first step of
each new shape runs one extra micro-batch through every stage to infer those shapes (measured: 3
block calls per block instead of 2 with 2 micro-batches); later steps of that shape do not.

The loss is the flow objective's per-sample loss (``mugen.flow.objective.flow_matching_loss``)
weighted and averaged over the micro-batch; the schedule scales gradients by 1 / micro-batches, so
the gradients are those of the mean over the whole batch, as in the single-process run.

Composition (``parallelize_dit`` with pp > 1): blocks made context- and/or tensor-parallel before
the cut keep it inside their stage, and the stages then send each other this rank's cp chunk / tp
slice of the hidden states (only the model's first block splits the sequence, only its last
gathers it); ``shard_data_parallel`` puts each stage under FSDP2 over the ranks that hold the same
stage (dp, and cp). ``mugen train dit --parallel pp=...`` drives this class through
``train/pipeline_run.py``.

Usage (one call per rank, every rank with the same batch, t and noise)::

    pipe = PipelinedDiT(model, pp_mesh, n_microbatches=4, schedule="1F1B")
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=...)   # this rank's stages only
    per_sample = pipe.flow_step(x0, text, t, noise, frame_cond_mask, fps, sample_weight)
    pipe.clip_grad_norm_(1.0)                                   # the norm over all stages
    optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from mugen.distributed.context_parallel import process_group_of
from mugen.distributed.mesh import PRECISION_DTYPES
from mugen.errors import MugenError
from mugen.flow.objective import flow_matching_loss, sample_flow_path
from mugen.models.common.rope import rope_rotations, video_rope_angles
from mugen.models.dit.model import MUGDiT
from mugen.models.text.base import TextFeatures

SCHEDULES = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe, "Interleaved1F1B": ScheduleInterleaved1F1B}
MULTI_STAGE_SCHEDULES = {"Interleaved1F1B"}


def stage_block_ranges(depth: int, num_stages: int) -> list[range]:
    """Blocks of each stage: contiguous, as equal as possible, the earlier stages one larger."""
    if num_stages < 1 or num_stages > depth:
        raise MugenError(
            f"pipeline: {num_stages} stages for a model of {depth} blocks; every stage needs at least one "
            "block, so use at most as many stages (pipeline size x stages per rank) as blocks"
        )
    base, extra = divmod(depth, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


class DiTPipelineStage(nn.Module):
    """One stage of MUG-DiT: a run of blocks, with the embedders (first stage) or the head (last).

    Holds the model's own submodules (no copies), under the model's parameter names: the blocks sit
    in a ModuleDict keyed by their index in the full model (``blocks.13.attn.qkv.weight``).

    forward(*activations, x0, t, noise, text_states, text_mask, fps, frame_cond_mask, frame_indices):
      first stage: activations = (x_t,) the noisy latents (B, C, T, H, W);
      other stages: the previous stage's outputs.
    Returns the activations for the next stage, or on the last stage the unweighted per-sample
    flow loss (B,).
    """

    def __init__(self, model: MUGDiT, stage_index: int, num_stages: int, blocks: range):
        super().__init__()
        self.config = model.config
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        if self.is_first:
            self.x_embedder = model.x_embedder
            self.t_embedder = model.t_embedder
            self.fps_embedder = model.fps_embedder
            self.t_block = model.t_block
            self.y_embedder = model.y_embedder
            self.start_token = model.start_token
            self.end_token = model.end_token
        self.blocks = nn.ModuleDict({str(index): model.blocks[index] for index in blocks})
        if self.is_last:
            self.final_layer = model.final_layer
        # No reference to ``model`` is kept: once every rank has built its stages, ``del model`` frees
        # the parameters of the other stages.

    # Parameter-free helpers of the model that read only ``self.config``.
    _patch_grid = MUGDiT.patch_grid
    _unpatchify = MUGDiT.unpatchify

    def _embed(self, x_t: Tensor, timestep: Tensor, text_states: Tensor, fps: Tensor | None):
        """The first stage's part of MUGDiT.forward: tokens, text and the global modulation signals."""
        cfg = self.config
        dtype = self.x_embedder.proj.weight.dtype
        batch, _, frames, height, width = x_t.shape
        grid_t, grid_h, grid_w = self._patch_grid((frames, height, width))
        latents = x_t.to(dtype)
        pad = (0, grid_w * cfg.patch_size[2] - width, 0, grid_h * cfg.patch_size[1] - height, 0, grid_t * cfg.patch_size[0] - frames)
        if any(pad):
            latents = F.pad(latents, pad)
        if fps is None:
            fps = torch.full((batch,), cfg.default_fps, device=latents.device)
        fps_emb = self.fps_embedder(fps.reshape(batch))
        timestep = timestep.reshape(batch).to(dtype)  # rounded to the weights' dtype, as the model does
        t_emb = self.t_embedder(timestep) + fps_emb  # (B, d)
        t0_emb = self.t_embedder(torch.zeros_like(timestep)) + fps_emb  # (B, d)
        text = self.y_embedder(text_states.to(dtype))  # (B, L, d)
        x = self.x_embedder(latents)  # (B, N, d)
        x = torch.cat([self.start_token.expand(batch, 1, -1), x, self.end_token.expand(batch, 1, -1)], dim=1)
        return x, text, self.t_block(t_emb), self.t_block(t0_emb), t_emb, t0_emb

    def _per_token_inputs(
        self, x0: Tensor, text_mask: Tensor | None, frame_cond_mask: Tensor | None, frame_indices: Tensor | None
    ):
        """Parameter-free inputs of the blocks, rebuilt on every stage: text mask, clean tokens, RoPE."""
        cfg = self.config
        batch, _, frames, height, width = x0.shape
        grid_t, grid_h, grid_w = self._patch_grid((frames, height, width))
        device = x0.device
        text_attn_mask = None
        if text_mask is not None and not bool(text_mask.all()):
            text_attn_mask = text_mask.to(device, torch.bool)[:, None, None, :]  # (B, 1, 1, L)
        clean_tokens = None
        if frame_cond_mask is not None and bool(frame_cond_mask.any()):
            frame_clean = frame_cond_mask.to(device, torch.bool)
            if grid_t * cfg.patch_size[0] != frames:
                frame_clean = F.pad(frame_clean, (0, grid_t * cfg.patch_size[0] - frames))
            frame_clean = frame_clean[:, :: cfg.patch_size[0]]  # (B, T')
            video_clean = frame_clean[:, :, None].expand(batch, grid_t, grid_h * grid_w).reshape(batch, -1)
            edge = torch.ones(batch, 1, dtype=torch.bool, device=device)  # start/end tokens: t = 0
            clean_tokens = torch.cat([edge, video_clean, edge], dim=1)[..., None]  # (B, N + 2, 1)
        if frame_indices is None:
            frame_indices = torch.arange(grid_t + 2, device=device).expand(batch, -1)
        angles = video_rope_angles(
            frame_indices.to(device), grid_h, grid_w, cfg.head_dim, cfg.rope_theta, cfg.rope_max_time
        )
        return text_attn_mask, clean_tokens, rope_rotations(angles)  # rope (B, 1, N + 2, hd / 2)

    def forward(
        self, *activations, x0, t, noise, text_states, text_mask=None, fps=None, frame_cond_mask=None, frame_indices=None
    ):
        if self.is_first:
            (x_t,) = activations
            x, text, t_mod, t0_mod, t_emb, t0_emb = self._embed(x_t, t * 1000.0, text_states, fps)
        else:
            x, text, t_mod, t0_mod, t_emb, t0_emb = activations
        text_attn_mask, clean_tokens, rope = self._per_token_inputs(x0, text_mask, frame_cond_mask, frame_indices)
        for block in self.blocks.values():
            x = block(x, text, text_attn_mask, t_mod, t0_mod, clean_tokens, rope)  # (B, N + 2, d)
        if not self.is_last:
            return x, text, t_mod, t0_mod, t_emb, t0_emb
        batch, channels, frames, height, width = x0.shape
        grid = self._patch_grid((frames, height, width))
        video_clean = None if clean_tokens is None else clean_tokens[:, 1:-1]
        out = self.final_layer(x[:, 1:-1], t_emb, t0_emb, video_clean)  # (B, N, p_t*p_h*p_w*2C)
        prediction = self._unpatchify(out, *grid)[:, :channels, :frames, :height, :width].float()
        return flow_matching_loss(lambda *_: prediction, x0, t, noise, frame_cond_mask)  # (B,)


def _weighted_mean(per_sample: Tensor, sample_weight: Tensor) -> Tensor:
    """The schedule's loss of one micro-batch: the weighted per-sample losses, averaged."""
    return (per_sample * sample_weight.to(per_sample.dtype)).mean()


class PipelinedDiT:
    """This rank's stages of a pipeline-parallel MUG-DiT and the schedule that drives them.

    ``schedule``: ``"1F1B"`` (default), ``"GPipe"`` or ``"Interleaved1F1B"`` (``stages_per_rank`` > 1;
    rank r holds stages r, r + P, r + 2P, ...). ``n_microbatches`` must divide every batch size.
    ``parameters()`` / ``state_dict()`` are this rank's share, under the full model's names.
    """

    def __init__(self, model: MUGDiT, pp_mesh, n_microbatches: int, schedule: str = "1F1B", stages_per_rank: int = 1):
        if schedule not in SCHEDULES:
            raise MugenError(f"pipeline: schedule={schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if (stages_per_rank > 1) != (schedule in MULTI_STAGE_SCHEDULES):
            raise MugenError(
                f"pipeline: schedule {schedule!r} with stages_per_rank={stages_per_rank}; Interleaved1F1B needs "
                "stages_per_rank >= 2, the other schedules exactly 1"
            )
        if n_microbatches < 1:
            raise MugenError(f"pipeline: n_microbatches={n_microbatches} must be at least 1")
        self.group = process_group_of(pp_mesh, "pipeline")
        self.pp_rank, self.pp_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.n_microbatches, self.schedule_name = n_microbatches, schedule
        self.num_stages = self.pp_size * stages_per_rank
        ranges = stage_block_ranges(len(model.blocks), self.num_stages)
        self.stage_indices = [self.pp_rank + v * self.pp_size for v in range(stages_per_rank)]
        self.stages = [DiTPipelineStage(model, index, self.num_stages, ranges[index]) for index in self.stage_indices]
        self.last_stage_rank = dist.get_global_rank(self.group, (self.num_stages - 1) % self.pp_size)
        self._schedules: dict[tuple, object] = {}  # input shape -> schedule over fresh PipelineStages

    @property
    def device(self) -> torch.device:
        """Where this rank's stages live (read when used: stages cut from a meta-device model are
        materialised afterwards, e.g. by ``pipeline_run.initialize_stages``)."""
        parameter = next(self.parameters())
        return parameter.to_local().device if isinstance(parameter, DTensor) else parameter.device

    def shard_data_parallel(
        self, dp_mesh, param_dtype: str = "bf16", reduce_dtype: str = "fp32", reshard_after_forward: bool = True
    ) -> None:
        """FSDP2 (HSDP on a 2D mesh) over the data-parallel ranks of this rank's stages, in place.

        Each block is one unit, then the stage itself (its embedders or head), as ``fsdp.apply_fsdp``
        does for the whole model. The pipeline schedule tells FSDP which backward is a step's last
        one, so gradients are reduced once per ``flow_step``. The stage root does not cast its
        inputs: the latents, noise and flow times of the loss stay in their own dtype (the blocks
        still compute in ``param_dtype``). Call before the first ``flow_step``.
        """
        if self._schedules:
            raise MugenError("pipeline: shard_data_parallel must come before the first flow_step")
        blocks_policy = MixedPrecisionPolicy(param_dtype=PRECISION_DTYPES[param_dtype], reduce_dtype=PRECISION_DTYPES[reduce_dtype])
        root_policy = MixedPrecisionPolicy(
            param_dtype=PRECISION_DTYPES[param_dtype], reduce_dtype=PRECISION_DTYPES[reduce_dtype], cast_forward_inputs=False
        )
        for stage in self.stages:
            blocks = list(stage.blocks.values())
            for index, block in enumerate(blocks):
                keep = index == len(blocks) - 1 and stage.is_last  # backward needs the last block at once
                fully_shard(block, mesh=dp_mesh, mp_policy=blocks_policy, reshard_after_forward=reshard_after_forward and not keep)
            fully_shard(stage, mesh=dp_mesh, mp_policy=root_policy, reshard_after_forward=reshard_after_forward)

    def named_parameters(self):
        """This rank's parameters under the full model's names (``blocks.13.attn.qkv.weight``)."""
        for stage in self.stages:
            yield from stage.named_parameters()

    def parameters(self):
        for _, parameter in self.named_parameters():
            yield parameter

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's share of the model's state dict, under the full model's names."""
        merged = {}
        for stage in self.stages:
            merged.update(stage.state_dict())
        return merged

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True) -> None:
        """Load this rank's entries from a full (or this rank's) state dict of the model."""
        for stage in self.stages:
            names = stage.state_dict().keys()
            stage.load_state_dict({name: value for name, value in state_dict.items() if name in names}, strict=strict)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip by the norm of the whole model's gradient (all stages); returns that norm.

        ``max_norm`` <= 0 only measures. Every pipeline rank must call it (one all-reduce).
        """
        from mugen.distributed.parallelize import clip_grad_norm_

        parameters = list(self.parameters())
        grads = [p.grad for p in parameters if p.grad is not None]
        # This rank's stages (DTensor shards of FSDP counted once), then summed over the stages.
        stage_norm = float(clip_grad_norm_(parameters, 0.0))
        squared = torch.tensor(stage_norm**2, dtype=torch.float64, device=self.device)
        dist.all_reduce(squared, group=self.group)
        total = squared.sqrt().float()
        if max_norm > 0 and float(total) > max_norm:
            scale = max_norm / (float(total) + 1e-6)
            for grad in grads:
                grad.mul_(scale)
        return total

    def _schedule_for(self, key: tuple):
        if key not in self._schedules:
            stages = [
                PipelineStage(stage, stage.stage_index, self.num_stages, self.device, group=self.group)
                for stage in self.stages
            ]
            schedule_class = SCHEDULES[self.schedule_name]
            target = stages if self.schedule_name in MULTI_STAGE_SCHEDULES else stages[0]
            self._schedules[key] = schedule_class(target, self.n_microbatches, loss_fn=_weighted_mean)
        return self._schedules[key]

    def _check_same_inputs(self, tensors: list[Tensor]) -> None:
        """Raise unless every pipeline rank holds the same t, noise and latents (checksums)."""
        sums = torch.stack([tensor.detach().double().sum() for tensor in tensors]).to(self.device)
        everyone = [torch.empty_like(sums) for _ in range(self.pp_size)]
        dist.all_gather(everyone, sums, group=self.group)
        if not all(torch.equal(other, everyone[0]) for other in everyone):
            raise MugenError(
                "pipeline: the ranks of a pipeline group got different latents, flow times or noise; every stage "
                "must see the same step inputs: seed the noise generator the same on every pipeline rank "
                "(not with the rank) and give every rank the same batch"
            )

    def flow_step(
        self,
        x0: Tensor,  # (B, C, T, H, W) clean latents
        text: TextFeatures,  # states (B, L, D), mask (B, L)
        t: Tensor,  # (B,) flow times in [0, 1]
        noise: Tensor,  # (B, C, T, H, W)
        frame_cond_mask: Tensor | None = None,  # (B, T) bool, True = clean conditioning frame
        fps: Tensor | None = None,  # (B,)
        sample_weight: Tensor | None = None,  # (B,)
        frame_indices: Tensor | None = None,  # (B, T + 2) time positions of [start, frames, end]
        check_inputs: bool = True,
    ) -> Tensor:
        """Forward and backward of one batch through the pipeline; gradients accumulate in ``.grad``.

        Returns the unweighted per-sample losses (B,) on every rank (sent from the last stage); the
        step's loss is ``(per_sample * sample_weight).mean()``, the single-process DiT task's loss.
        """
        batch = x0.shape[0]
        if batch % self.n_microbatches:
            raise MugenError(
                f"pipeline: batch of {batch} samples does not split into {self.n_microbatches} equal micro-batches; "
                "make the batch size a multiple of n_microbatches"
            )
        if sample_weight is None:
            sample_weight = torch.ones(batch, device=x0.device)
        if check_inputs:
            self._check_same_inputs([x0, t, noise, text.states])
        path = sample_flow_path(x0, t, noise, frame_cond_mask)  # x_t: the first stage's input
        inputs = {"x0": x0, "t": t, "noise": noise, "text_states": text.states}
        if text.mask is not None:
            inputs["text_mask"] = text.mask
        if fps is not None:
            inputs["fps"] = fps
        if frame_cond_mask is not None:
            inputs["frame_cond_mask"] = frame_cond_mask
        if frame_indices is not None:
            inputs["frame_indices"] = frame_indices
        key = tuple((name, tuple(value.shape)) for name, value in inputs.items())
        schedule = self._schedule_for(key)
        holds_first = 0 in self.stage_indices
        holds_last = self.num_stages - 1 in self.stage_indices
        args = (path.x_t,) if holds_first else ()
        per_sample = schedule.step(*args, target=sample_weight if holds_last else None, **inputs)
        if not holds_last:
            per_sample = torch.empty(batch, device=self.device)
        per_sample = per_sample.detach().float().contiguous()
        dist.broadcast(per_sample, src=self.last_stage_rank, group=self.group)
        return per_sample
