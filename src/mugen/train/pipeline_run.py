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

Tested against the single-process run (tests/distributed/test_distributed_train_pipeline.py): pp=2,
pp=2 x dp_shard=2 and pp=2 x tp=2, resumed on pp=2, dp_shard=2 and tp=2. Refused: the interleaved
schedule (one stage per rank here) and micro-batch counts that do not divide every data-parallel
share of a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mugen.distributed.checkpoint import DistributedCheckpointer, _canonical_view, _training_state_dicts
from mugen.distributed.tensor_parallel import FUSED_ROWS_ATTRIBUTE
from mugen.errors import MugenError
from mugen.train.distributed_run import DistributedStrategy, ParallelRun
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


class PipelineShare:
    """A ``TrainTask`` wrapper: this data-parallel group's rows of each global micro-batch, through the pipeline.

    The loss is the share's weighted mean times ``share * count / batch``, as in
    ``DataParallelShare``: FSDP's average over the ``count`` groups gives the global batch's mean.
    """

    def __init__(self, task, pipe, index: int, count: int):
        if not hasattr(task, "draw_inputs"):
            raise MugenError(f"pipeline parallel training needs a DiT flow task (draw_inputs); got {type(task).__name__}")
        self.task, self.pipe, self.index, self.count = task, pipe, index, count

    def compute_loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> LossOutput:
        batch_size = int(batch["latents"].shape[0])
        rows = data_parallel_rows(batch_size, self.index, self.count)
        default_fps = model.config.default_fps if batch.get("fps") is not None else None
        inputs = self.task.draw_inputs(batch, generator, default_fps, rows)
        scale = (rows.stop - rows.start) * self.count / batch_size
        parameters = list(self.pipe.parameters())
        held = [parameter.grad for parameter in parameters]  # earlier micro-batches of this step
        for parameter in parameters:
            parameter.grad = None
        per_sample = self.pipe.flow_step(
            inputs.x0, inputs.text, inputs.t, inputs.noise, inputs.frame_cond_mask,
            fps=inputs.fps, sample_weight=inputs.weights * scale,
        )  # (share,) unweighted, the same on every stage
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
        return LossOutput(
            loss=loss, per_sample=weighted, timesteps=inputs.t.detach(), metrics={"text_dropped": inputs.text_dropped}
        )


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


class PipelineStrategy(DistributedStrategy):
    """The Trainer's reduce/clip/save/load over pipeline stages (see the module docstring)."""

    def __init__(self, mesh, layout: dict, pipe, parameter_names: list[str]):
        super().__init__(mesh, layout)
        self.pipe, self.parameter_names = pipe, parameter_names

    def clip_grad_norm(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        return float(self.pipe.clip_grad_norm_(max_norm))  # the norm over every stage

    def checkpointer(self, trainer: Trainer):
        if self._checkpointer is None:
            self._checkpointer = PipelineCheckpointer(
                trainer.output_dir,
                trainer.model,
                trainer.optimizer,
                layout=self.layout,
                keep_checkpoints=trainer.config.keep_checkpoints,
                parameter_names=self.parameter_names,
            )
        return self._checkpointer


class PipelineRun(ParallelRun):
    """The mesh, the stages and the Trainer pieces of a run with ``pp`` > 1."""

    def __init__(self, config, device: str, batch_sizes: tuple[int | None, ...] = ()):
        if config.pp_schedule == "Interleaved1F1B":
            raise MugenError(
                "--parallel pp_schedule=Interleaved1F1B: `mugen train dit` keeps one stage per rank; use 1F1B or GPipe"
            )
        micro = config.pp_microbatches
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
        super().__init__(config, device)
        self.pipe, self.parameter_names = None, []

    def build_model(self, model_config, build_single_device: Callable[[], nn.Module]) -> nn.Module:
        """This rank's stage (parameters under the single-device names), with ``build_single_device()``'s weights."""
        from mugen.distributed import parallelize_dit
        from mugen.models.dit import MUGDiT

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
        if getattr(sampler, "is_stream", False):
            raise MugenError("--balanced together with pipeline stages (--parallel pp=...) is not available yet; drop one of them")
        return PipelineShare(task, self.pipe, self.dp_index, self.dp_count)

    def strategy(self) -> PipelineStrategy:
        return PipelineStrategy(self.mesh, self.layout, self.pipe, self.parameter_names)
