"""`mugen train dit --parallel pp=...`: the Trainer over pipeline stages (seed §5.1).

``distributed_run.parallel_run_for`` picks ``PipelineRun`` when ``pp`` > 1. The model is cut into
``pp`` stages along its depth (``distributed/pipeline.py``, through ``parallelize_dit``); every rank
keeps one stage. The other axes act inside a stage: ``tp``/``cp`` split its blocks' work (the
stages send each other tp slices / cp chunks), and with ``dp_shard``/``dp_replicate`` (or ``cp``) > 1
each stage is sharded with FSDP2 over the ranks that hold the same stage. What changes against
``distributed_run.py``, and why the numbers do not:

* ``trainer.model`` is this rank's stage, an ``nn.Module`` whose parameters keep the single-device
  names (``blocks.3.attn.qkv.weight``): the optimizer, clipping and the sharded checkpoints
  (``DistributedCheckpointer``) see this rank's share of the model under its real names.
* Every rank draws the whole global batch's flow times, noise, first-frame masks and text dropout
  from the per-step seed (``DiTFlowTask.draw_inputs``, the Trainer's ``micro_batch_seed``), so all
  stages of a pipeline see the same step inputs (``PipelinedDiT`` checks it); a data-parallel group
  takes its rows, as ``DataParallelShare`` does.
* The pipeline schedule runs forward and backward of a micro-batch in one call, while the Trainer
  computes a loss, then calls ``backward()`` on it scaled by ``1 / grad_accum``. The task wrapper
  therefore runs the schedule, sets this step's gradients aside, and returns a loss whose
  ``backward(g)`` adds ``g x`` those gradients to ``.grad`` (a non-finite loss, which the Trainer
  never backpropagates, leaves ``.grad`` untouched).
* The logged loss is the global batch's (every rank holds its data-parallel group's loss, the last
  stage's value broadcast over the pipeline); clipping uses the norm over all stages.
* Checkpoints are the sharded checkpoints of ``distributed_run.py`` (``DistributedCheckpointer``:
  single-device names, each rank writes its stage's parameters and AdamW moments), so a pipeline
  run resumes on a layout without stages and the other way round.
* ``--ema-decay`` / ``--snapshot-every`` (seed §4.2.3): ``PipelineWeightAverages`` keeps the online
  EMA and the power-function EMAs of this rank's stage (its FSDP/TP shards), updated locally after
  every optimizer step and saved with the stage (``PipelineAveragesCheckpointer``: the checkpoint
  holds the whole model's averages under single-device names, resumable with or without stages).
  Snapshots and the EMA export gather each tensor inside its stage and send it to rank 0
  (``gathered_across_stages``), which writes the single-process run's ``snapshots/step_*`` and
  ``ema/`` files, named after a meta-device MUG-DiT.
* ``--balanced`` (seed §5.2): every rank reads the single-process balanced run's global step;
  ``BalancedRowSplit`` splits each micro-batch's rows by cost over the data-parallel groups (as
  without stages), and each group's share (any size, even none) is padded to a multiple of
  ``pp_microbatches`` with zero-weight copies of its first row, the real rows' weights raised so the
  schedule's mean is theirs: the pipeline micro-batches of a share hold equal rows of one shape.
  The gradient is the single-process run's (padding adds exact zeros).
* Curricula (``curriculum_run.py``, seed §4.2.2): the curriculum task's ``draw_inputs`` applies the
  stage's first-frame masking and ``PipelineShare`` logs its ``step_metrics``; the held-out loss of
  the plateau decisions runs forward through the stages (``pipeline_validation_loss``: the rows of
  ``flow_validation_loss``, padded to the pipeline micro-batches); the curriculum's JSON state rides
  in the checkpoint's training state (only the EMAs are saved as shards).

Tested against the single-process run (tests/distributed/test_distributed_train_pipeline.py,
test_distributed_train_pipeline_averages.py): pp=2, pp=2 x dp_shard=2 and pp=2 x tp=2, resumed on
pp=2, dp_shard=2 and tp=2; --balanced on pp=2 (resumed on dp_shard=2) and pp=2 x dp_shard=2; EMA and
snapshots on pp=2 and pp=2 x dp_shard=2, resumed on pp=2 (bitwise) and dp_shard=2; curricula
(test_distributed_train_curriculum.py) on pp=2 and pp=2 x dp_shard=2, resumed from pp=2 on dp_shard=2 (with
and without EMA) and from dp_shard=2 on pp=2. Refused: the
interleaved schedule (one stage per rank here), 1F1B with fewer micro-batches than stages, and
(without --balanced) micro-batch counts that do not divide every data-parallel share of a batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mugen.distributed.checkpoint import DistributedCheckpointer, _canonical_view, _training_state_dicts
from mugen.distributed.ema import AveragesCheckpointer
from mugen.distributed.tensor_parallel import FUSED_ROWS_ATTRIBUTE, canonical_rows
from mugen.errors import MugenError
from mugen.train.distributed_run import BalancedRowSplit, DistributedStrategy, ParallelRun, ShardedWeightAverages
from mugen.train.trainer import LossOutput, Trainer

log = logging.getLogger(__name__)


def data_parallel_rows(batch_size: int, index: int, count: int) -> slice:
    """Rows of data-parallel group ``index`` of ``count`` (as ``DataParallelShare.rows``)."""
    return slice(index * batch_size // count, (index + 1) * batch_size // count)


def initialize_stages(pipe, entries: list[tuple[str, torch.Size, torch.dtype]], build: Callable[[], nn.Module], device) -> None:
    """Give the stages (cut from a meta-device model) the weights ``build()`` makes on rank 0.

    ``entries``: (name, shape, dtype) of the whole model's state dict, in its order. Rank 0
    broadcasts each tensor; every rank keeps the ones its stages hold (FSDP stages take their shard).
    """
    from mugen.distributed.checkpoint import load_full_state_dict

    for stage in pipe.stages:
        stage.to_empty(device=device)
    reference = build() if dist.get_rank() == 0 else None
    full = reference.state_dict() if reference is not None else None
    wanted = [set(stage.state_dict()) for stage in pipe.stages]
    mine: list[dict[str, Tensor]] = [{} for _ in pipe.stages]
    for name, shape, dtype in entries:
        tensor = full[name].to(device, dtype) if full is not None else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=0)
        for index, names in enumerate(wanted):
            if name in names:
                mine[index][name] = tensor
    del reference, full
    for stage, state in zip(pipe.stages, mine):
        load_full_state_dict(stage, state, source="the single-device model")


class _ScheduledGradients(torch.autograd.Function):
    """The loss of a micro-batch whose backward already ran inside the pipeline schedule.

    Forward returns ``value``; backward adds ``grad x`` the set-aside gradients to ``.grad``.
    """

    @staticmethod
    def forward(ctx, anchor: Tensor, value: Tensor, add_gradients: Callable[[float], None]) -> Tensor:
        ctx.add_gradients = add_gradients
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.add_gradients(float(grad))
        return None, None, None


def padded_rows(inputs, rows: int):
    """``inputs`` (``FlowInputs`` of n rows) grown to ``rows`` rows by repeating its first row (loss weight 0 there)."""
    from mugen.models.text.base import TextFeatures

    present = int(inputs.x0.shape[0])
    if rows == present:
        return inputs
    index = torch.cat([torch.arange(present), torch.zeros(rows - present, dtype=torch.long)]).to(inputs.x0.device)

    def grown(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.index_select(0, index.to(tensor.device))

    weights = grown(inputs.weights)
    weights[present:] = 0.0
    return dataclasses.replace(
        inputs, x0=grown(inputs.x0), t=grown(inputs.t), noise=grown(inputs.noise), frame_cond_mask=grown(inputs.frame_cond_mask),
        text=TextFeatures(grown(inputs.text.states), grown(inputs.text.mask)), fps=grown(inputs.fps), weights=weights,
    )


class PipelineShare:
    """A ``TrainTask`` wrapper: this data-parallel group's rows of each global micro-batch, through the pipeline.

    The loss is the share's weighted mean times ``share * count / batch``, as in
    ``DataParallelShare``: FSDP's average over the ``count`` groups gives the global batch's mean.
    With ``split`` (a ``BalancedRowSplit``, ``--balanced``, seed §5.2) the rows of each micro-batch
    of the global balanced step are split by cost as ``BalancedDataParallelShare`` does.

    The schedule cuts the share into ``pp_microbatches`` equal pipeline micro-batches. A share that
    does not split evenly (balanced micro-batches have any size; a share may even be empty) is padded
    with copies of its first row of loss weight 0, and the real rows' weights are raised by
    padded / real so the schedule's mean over the padded rows is the mean over the real ones: the
    pipeline micro-batches of a share have equal rows of one shape, so near-equal cost, and the
    padding adds exact zeros to the gradient.
    """

    def __init__(self, task, pipe, index: int, count: int, split: BalancedRowSplit | None = None):
        if not hasattr(task, "draw_inputs"):
            raise MugenError(f"pipeline parallel training needs a DiT flow task (draw_inputs); got {type(task).__name__}")
        self.task, self.pipe, self.index, self.count, self.split = task, pipe, index, count, split

    def compute_loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> LossOutput:
        batch_size = int(batch["latents"].shape[0])
        metrics = {}
        if self.split is None:
            rows = data_parallel_rows(batch_size, self.index, self.count)
            mine = rows.stop - rows.start
        else:
            start, mine, step_imbalance = self.split.take(batch)
            rows = slice(start, start + mine) if mine else slice(0, 1)  # no row of this micro-batch: the first one, weight 0
            metrics["rank_cost_imbalance"] = step_imbalance
        default_fps = model.config.default_fps if batch.get("fps") is not None else None
        inputs = self.task.draw_inputs(batch, generator, default_fps, rows)
        scale = mine * self.count / batch_size
        micro = self.pipe.n_microbatches
        drawn = rows.stop - rows.start
        padded = -(-drawn // micro) * micro  # a multiple of the pipeline's micro-batches
        sample_weight = inputs.weights * scale
        if padded != mine:
            sample_weight = sample_weight * (padded / mine if mine else 0.0)
        run = padded_rows(dataclasses.replace(inputs, weights=sample_weight), padded)
        parameters = list(self.pipe.parameters())
        held = [parameter.grad for parameter in parameters]  # earlier micro-batches of this step
        for parameter in parameters:
            parameter.grad = None
        per_sample = self.pipe.flow_step(
            run.x0, run.text, run.t, run.noise, run.frame_cond_mask, fps=run.fps, sample_weight=run.weights,
        )[:drawn]  # (drawn,) unweighted, the same on every stage; the padding rows dropped
        fresh = [parameter.grad for parameter in parameters]  # d(scale * weighted mean) / d(weights)
        for parameter, grad in zip(parameters, held):
            parameter.grad = grad

        def add_gradients(factor: float) -> None:
            for parameter, grad in zip(parameters, fresh):
                if grad is None:
                    continue
                grad.mul_(factor)
                parameter.grad = grad if parameter.grad is None else parameter.grad.add_(grad)

        weighted = per_sample * inputs.weights.to(per_sample)
        anchor = torch.zeros((), device=per_sample.device, requires_grad=True)
        loss = _ScheduledGradients.apply(anchor, weighted.mean() * scale, add_gradients)
        step_metrics = getattr(self.task, "step_metrics", None)  # e.g. a curriculum's stage and image ratio
        if step_metrics is not None:
            metrics.update(step_metrics(batch))
        return LossOutput(
            loss=loss, per_sample=weighted[:mine], timesteps=inputs.t.detach()[:mine],
            metrics={"text_dropped": inputs.text_dropped, **metrics},
        )


@torch.no_grad()
def pipeline_validation_loss(
    pipe,
    samples: list[dict],
    *,
    num_levels: int = 8,
    seed: int = 0,
    spatial_factor: int = 8,
    shift_base_resolution: int = 512 * 512,
    batch_size: int = 32,
) -> float:
    """``mugen.train.validation.flow_validation_loss`` computed through the pipeline stages (a collective).

    The same rows (every held-out sample at the same ``num_levels`` fixed noise levels, the same
    noise), ``batch_size`` rows at a time, each chunk run forward only through the stages
    (``schedule.eval``; a chunk is padded to a multiple of the pipeline micro-batches by repeating
    its first row, whose losses are dropped). Every rank of the job calls it with the same samples
    (the data-parallel groups compute the same value) and gets the mean loss. Used by curriculum runs
    on pipeline stages for their plateau decisions (seed §4.2.2).
    """
    from mugen.flow.objective import sample_flow_path
    from mugen.train.validation import validation_batches

    device = pipe.device
    batches = validation_batches(
        samples, num_levels=num_levels, seed=seed, spatial_factor=spatial_factor, shift_base_resolution=shift_base_resolution,
        batch_size=batch_size, default_fps=pipe.stages[0].config.default_fps, device=device, pad_to=pipe.n_microbatches,
    )
    holds_first = 0 in pipe.stage_indices
    holds_last = pipe.num_stages - 1 in pipe.stage_indices
    was_training = [stage.training for stage in pipe.stages]
    for stage in pipe.stages:
        stage.eval()
    total, count = 0.0, 0
    try:
        for rows, batch in batches:  # rows past ``rows`` repeat the first one: their losses are dropped below
            x0 = batch["latents"]  # (B, C, T, h, w)
            padded = x0.shape[0]
            inputs = {name: batch[name] for name in ("t", "noise", "text_states", "text_mask", "fps")}
            inputs = {"x0": x0, **inputs}
            key = (("eval", ()),) + tuple((name, tuple(value.shape)) for name, value in inputs.items())
            schedule = pipe._schedule_for(key)  # forward only: a schedule of its own
            args = (sample_flow_path(x0, inputs["t"], inputs["noise"], None).x_t,) if holds_first else ()
            weights = torch.ones(padded, device=device)
            per_sample = schedule.eval(*args, target=weights if holds_last else None, **inputs)
            if not holds_last:
                per_sample = torch.empty(padded, device=device)
            per_sample = per_sample.detach().float().contiguous()  # (B,) unweighted
            dist.broadcast(per_sample, src=pipe.last_stage_rank, group=pipe.group)
            total += float(per_sample[:rows].double().sum())
            count += rows
    finally:
        for stage, training in zip(pipe.stages, was_training):
            stage.train(training)
    return total / count


class PipelineCheckpointer(DistributedCheckpointer):
    """``DistributedCheckpointer`` whose optimizer state names every parameter of the model.

    The optimizer state lists its parameters by name in ``param_groups``; each pipeline rank holds
    other parameters, and DCP keeps one rank's copy of that list. Here every rank writes the list of
    the whole model (the same everywhere), so the checkpoint reads as one written by a run without
    stages: it resumes on any layout, with or without pp, and a pipeline run resumes any sharded
    checkpoint (each rank picks its parameters' moments by name).
    """

    def __init__(self, *args, parameter_names: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.parameter_names = list(parameter_names)

    def _view(self) -> tuple[dict, dict]:
        state = _training_state_dicts(self.model, self.optimizer)
        for group in state["optimizer"].get("param_groups", []):
            group["params"] = list(self.parameter_names)
        view = _canonical_view(state, getattr(self.model, FUSED_ROWS_ATTRIBUTE, {}))  # [q|k|v] rows on disk
        view.update(self.extra_tensors_view())
        return state, view


class PipelineAveragesCheckpointer(PipelineCheckpointer, AveragesCheckpointer):
    """``PipelineCheckpointer`` with the stage's weight averages (seed §4.2.3), as ``AveragesCheckpointer`` saves them.

    Each rank writes its stage's shards of every average under ``<average>.<parameter name>``
    (single-device names and rows), so the checkpoint holds the averages of the whole model, as one
    written without stages: it resumes the averages on any layout, and a pipeline run resumes the
    averages of any sharded checkpoint (each stage reads its parameters' entries).
    """


def gathered_across_stages(named: dict[str, Tensor], stage: nn.Module) -> dict[str, Tensor]:
    """Single-device CPU copies of every stage's ``named`` tensors on rank 0, {} elsewhere (a collective).

    Every rank names its tensors (names, global shapes, dtypes: one ``all_gather_object``); then,
    name by name in one order every rank computes, the ranks holding a tensor (a stage's dp/tp/cp
    ranks) gather it (``full_tensor``, fused rows back to [q|k|v]), the lowest of them sends it to
    rank 0 unless that is rank 0 itself, and rank 0 receives it. Rank 0 holds one stage, so it gets
    the whole model one tensor at a time and never more than one tensor of another stage in flight.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in named.items()}
    everyone: list[dict] = [None] * world
    dist.all_gather_object(everyone, mine)
    holders: dict[str, list[int]] = {}
    for holder, names in enumerate(everyone):
        for name in names:
            holders.setdefault(name, []).append(holder)
    fused_rows = getattr(stage, FUSED_ROWS_ATTRIBUTE, {})
    device = next(iter(named.values())).device if named else torch.device("cpu")
    full: dict[str, Tensor] = {}
    for name, ranks in holders.items():  # first seen on the lowest rank: the same order everywhere
        sender = ranks[0]
        tensor = None
        if rank in ranks:
            tensor = named[name]
            tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            tensor = tensor.detach()
            if name in fused_rows:
                tensor = canonical_rows(tensor, fused_rows[name])
            if rank == sender and rank != 0:
                dist.send(tensor.contiguous(), dst=0)
        elif rank == 0:
            shape, dtype = everyone[sender][name]
            tensor = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(tensor, src=sender)
        if rank == 0:
            full[name] = tensor.to("cpu").clone()
    return full


class PipelineWeightAverages(ShardedWeightAverages):
    """``ShardedWeightAverages`` of a pipeline run (seed §4.2.3): each rank averages its stage's parameters.

    The averages are built from ``trainer.model`` (this rank's stage, single-device names; FSDP/TP
    shards as DTensors) and updated locally; ``PipelineStrategy`` checkpoints them with the stage.
    Snapshots and the EMA export gather every stage's tensors to rank 0
    (``gathered_across_stages``), which writes the single-process run's files, naming them after
    ``naming_model`` (the whole MUG-DiT on the meta device: names and tied aliases, no weights).
    """

    def __init__(self, *args, naming_model: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self._naming_model = naming_model

    def gather(self, named: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        return gathered_across_stages(named, model)

    def naming_model(self, model: nn.Module) -> nn.Module:
        return self._naming_model


class PipelineStrategy(DistributedStrategy):
    """The Trainer's reduce/clip/save/load over pipeline stages (see the module docstring)."""

    def __init__(self, mesh, layout: dict, pipe, parameter_names: list[str]):
        super().__init__(mesh, layout)
        self.pipe, self.parameter_names = pipe, parameter_names

    def clip_grad_norm(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        return float(self.pipe.clip_grad_norm_(max_norm))  # the norm over every stage

    def checkpointer(self, trainer: Trainer):
        """The stage's sharded checkpointer; with the Trainer's ``extra_state`` (weight averages) those too."""
        if self._checkpointer is None:
            averages = self.sharded_extra_state(trainer)  # the EMAs; JSON states (a curriculum's) ride in the training state
            common = dict(
                layout=self.layout, keep_checkpoints=trainer.config.keep_checkpoints, parameter_names=self.parameter_names
            )
            if averages:  # the stage's EMA shards beside its parameters' (seed §4.2.3)
                self._checkpointer = PipelineAveragesCheckpointer(
                    trainer.output_dir, trainer.model, trainer.optimizer, averages=averages, **common
                )
            else:
                self._checkpointer = PipelineCheckpointer(trainer.output_dir, trainer.model, trainer.optimizer, **common)
        return self._checkpointer


class PipelineRun(ParallelRun):
    """The mesh, the stages and the Trainer pieces of a run with ``pp`` > 1.

    ``batch_sizes``: the run's fixed micro-batch sizes, checked to split into ``pp_microbatches``
    per data-parallel share (empty with ``--balanced``, whose shares are padded instead).
    ``micro_batches``: the Trainer's micro-batches per step (``grad_accum``), the step boundary of
    the balanced row split.
    """

    def __init__(self, config, device: str, batch_sizes: tuple[int | None, ...] = (), micro_batches: int = 1):
        if config.pp_schedule == "Interleaved1F1B":
            raise MugenError(
                "--parallel pp_schedule=Interleaved1F1B: `mugen train dit` keeps one stage per rank; use 1F1B or GPipe"
            )
        micro = config.pp_microbatches
        if config.pp_schedule == "1F1B" and micro < config.pp:
            raise MugenError(
                f"--parallel pp={config.pp},pp_microbatches={micro}: the 1F1B schedule needs at least as many "
                f"micro-batches as stages; set pp_microbatches={config.pp} or more, or pp_schedule=GPipe"
            )
        for size in (size for size in batch_sizes if size):
            rows = [data_parallel_rows(size, index, config.data_parallel_size) for index in range(config.data_parallel_size)]
            shares = {part.stop - part.start for part in rows}
            uneven = sorted(share for share in shares if share % micro)
            if uneven:
                raise MugenError(
                    f"batch size {size} gives data-parallel shares of {sorted(shares)} samples, which do not split into "
                    f"pp_microbatches={micro}; make every share a multiple of {micro} (batch size = a multiple of "
                    f"{micro * config.data_parallel_size}) or change pp_microbatches"
                )
        super().__init__(config, device, micro_batches=micro_batches)
        self.pipe, self.parameter_names, self.model_config = None, [], None

    def build_model(self, model_config, build_single_device: Callable[[], nn.Module]) -> nn.Module:
        """This rank's stage (parameters under the single-device names), with ``build_single_device()``'s weights."""
        from mugen.distributed import parallelize_dit
        from mugen.models.dit import MUGDiT

        self.model_config = model_config
        with torch.device("meta"):
            model = MUGDiT(model_config)
        entries = [(name, tensor.shape, tensor.dtype) for name, tensor in model.state_dict().items()]
        self.parameter_names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
        self.pipe = parallelize_dit(model, self.mesh, self.config)
        del model  # the stages keep their own submodules
        initialize_stages(self.pipe, entries, build_single_device, self.device)
        (stage,) = self.pipe.stages
        log.info(
            "rank %d: pipeline stage %d of %d, blocks %s",
            dist.get_rank(), stage.stage_index, stage.num_stages, list(stage.blocks.keys()),
        )
        return stage

    def wrap_task(self, task, sampler=None) -> PipelineShare:
        """This data-parallel group's share of every global micro-batch, through the pipeline; split by cost with a balanced sampler."""
        split = None
        if getattr(sampler, "is_stream", False):
            if sampler.world_size != 1:
                raise MugenError(
                    f"the balanced sampler plans {sampler.world_size} ranks; on several processes build it with "
                    "world_size=1, rank=0 (every rank reads the global step, the rows are split per rank)"
                )
            split = BalancedRowSplit(sampler, self.dp_index, self.dp_count, self.micro_batches)
        return PipelineShare(task, self.pipe, self.dp_index, self.dp_count, split)

    def weight_averages(self, *args, **kwargs) -> PipelineWeightAverages:
        """``WeightAverages(*args, **kwargs)`` of this rank's stage, gathered over the stages on export."""
        from mugen.models.dit import MUGDiT

        if self.model_config is None:
            raise MugenError("PipelineRun.weight_averages: call build_model first (the averages follow its stage)")
        with torch.device("meta"):
            naming_model = MUGDiT(self.model_config)  # names only: no memory
        return PipelineWeightAverages(*args, naming_model=naming_model, **kwargs)

    def validation_loss(self, model: nn.Module, samples: list[dict], **options) -> float:
        """The held-out loss of ``flow_validation_loss(model, samples, **options)``, through the stages (a collective)."""
        return pipeline_validation_loss(self.pipe, samples, **options)

    def strategy(self) -> PipelineStrategy:
        return PipelineStrategy(self.mesh, self.layout, self.pipe, self.parameter_names)
