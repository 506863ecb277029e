"""`mugen train dit` on several processes: the Trainer over a parallelized MUG-DiT (seed §5.1).

Launched by ``torchrun --nproc-per-node N -m mugen train dit ... --parallel dp_shard=2,tp=2`` (or a
``"parallel"`` config section). What changes against the single-process run, and why the numbers
do not:

* The model is built on the meta device, laid over the mesh by ``parallelize_dit`` and given the
  weights the single-process run starts from (same seed, or ``--init-from``), built once on rank 0
  and broadcast (``initialize_from_single_device``).
* Every rank reads the same global batches (the same sampler and seed) and draws the same noise,
  flow times and text dropout for the whole batch (per-step seeds, ``micro_batch_seed``); each
  data-parallel group then computes the loss of its own rows (``DataParallelShare``). Ranks of one
  tp/cp group take the same rows. The share's loss is scaled so that FSDP's gradient average over
  the data-parallel ranks is the gradient of the whole global batch's mean loss.
* ``DistributedStrategy`` replaces the Trainer's single-process steps: the logged loss is the global
  batch's (all-reduced), clipping is DTensor-aware, checkpoints are sharded
  (``DistributedCheckpointer``: atomic, ``latest``, resumable on the same or another layout), and
  only rank 0 writes logs, metrics and the loss curve.

Tested on gloo/CPU against the single-process run (tests/distributed/test_distributed_train.py):
dp_shard, tp, cp, dp_shard x tp, gradient accumulation, resume on the same or another layout
(cp x tp and pipeline stages, ``PipelineRun`` of pipeline_run.py: test_distributed_train_pipeline.py).
Not wired yet: the balanced sampler, EMA/snapshots and curricula on
several processes (each raises a MugenError naming the option). Every rank reads the whole global
batch (simple and deterministic; the data-loading cost is repeated per rank), and the per-timestep
loss bins and ``samples`` in the logs are rank 0's share.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mugen.errors import MugenError
from mugen.train.trainer import LossOutput, SingleProcess, Trainer

log = logging.getLogger(__name__)

_BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_parallel(text: str) -> dict:
    """``"dp_shard=2,tp=2"`` -> ``{"dp_shard": 2, "tp": 2}`` (keys and value types of ``ParallelConfig``)."""
    from mugen.distributed.mesh import ParallelConfig

    fields = {f.name: f for f in dataclasses.fields(ParallelConfig)}
    values: dict = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key or not raw:
            raise MugenError(f"--parallel {text!r}: {item!r} is not KEY=VALUE; write e.g. dp_shard=2,tp=2")
        if key not in fields:
            raise MugenError(f"--parallel {text!r}: unknown key {key!r}; known keys are {sorted(fields)}")
        default = fields[key].default
        if isinstance(default, bool):
            if raw.lower() not in _BOOLEAN_WORDS:
                raise MugenError(f"--parallel {text!r}: {key}={raw!r} must be true or false")
            values[key] = _BOOLEAN_WORDS[raw.lower()]
        elif isinstance(default, int):
            try:
                values[key] = int(raw)
            except ValueError:
                raise MugenError(f"--parallel {text!r}: {key}={raw!r} must be a whole number") from None
        else:
            values[key] = raw
    if not values:
        raise MugenError(f"--parallel {text!r}: no axis given; write e.g. dp_shard=2,tp=2")
    return values


def job_world_size() -> int:
    """Processes in this job: the initialised group's size, else torchrun's ``WORLD_SIZE`` (1 when absent)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MugenError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun") from None


def parallel_config(values: dict | None, world_size: int, autocast: bool):
    """The ``ParallelConfig`` of a run; None = the single-process run (no layout and one process).

    Without a layout on several processes every rank is a data-parallel shard (``dp_shard`` = world
    size). FSDP computes in bf16 only when the run autocasts (``param_dtype`` defaults to it), so a
    CPU/fp32 run gives the single-process numbers.
    """
    from mugen.distributed.mesh import ParallelConfig
    from mugen.train.runs import dataclass_from_dict

    if values is None:
        if world_size == 1:
            return None
        values = {"dp_shard": world_size}
        log.info("%d processes and no --parallel layout: data parallel, dp_shard=%d", world_size, world_size)
    values = dict(values)
    values.setdefault("param_dtype", "bf16" if autocast else "fp32")
    config = dataclass_from_dict(ParallelConfig, values, "--parallel / config section 'parallel'")
    config.validate(world_size)
    if world_size == 1:
        return None  # a one-rank layout is the single-process run
    return config


class DataParallelShare:
    """A ``TrainTask`` wrapper: this data-parallel group's rows of each global micro-batch.

    The inner task draws noise, flow times and dropout for the whole batch and computes the loss of
    ``rows`` only (``DiTFlowTask.compute_loss(..., rows=)``). The returned loss is the share's mean
    times ``share * count / batch``: FSDP averages gradients over the ``count`` groups, which then
    gives the gradient of the whole batch's mean loss even when the batch does not split evenly.
    """

    def __init__(self, task, index: int, count: int):
        self.task, self.index, self.count = task, index, count

    def rows(self, batch_size: int) -> slice:
        if batch_size < self.count:
            raise MugenError(
                f"a micro-batch of {batch_size} samples cannot be split over {self.count} data-parallel ranks; "
                f"use --batch-size (and --image-batch-size) of at least {self.count}, or fewer dp ranks"
            )
        return slice(self.index * batch_size // self.count, (self.index + 1) * batch_size // self.count)

    def compute_loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> LossOutput:
        batch_size = int(batch["latents"].shape[0])
        rows = self.rows(batch_size)
        output = self.task.compute_loss(model, batch, generator, rows=rows)
        output.loss = output.loss * ((rows.stop - rows.start) * self.count / batch_size)
        return output


class DistributedStrategy(SingleProcess):
    """The Trainer's reduce/clip/save/load on several processes (see the module docstring)."""

    def __init__(self, mesh, layout: dict):
        self.mesh = mesh
        self.layout = layout
        self.world_size = dist.get_world_size()
        self.is_main = dist.get_rank() == 0
        self._checkpointer = None

    def loss_value(self, loss: Tensor) -> float:
        # Each tp/cp rank holds its group's value; the sum over all ranks / world = the global batch's mean.
        total = loss.detach().float().reshape(1).clone()
        dist.all_reduce(total)
        return float(total) / self.world_size

    def clip_grad_norm(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        from mugen.distributed import clip_grad_norm_

        return float(clip_grad_norm_(parameters, max_norm))

    def checkpointer(self, trainer: Trainer):
        from mugen.distributed import DistributedCheckpointer

        if self._checkpointer is None:
            self._checkpointer = DistributedCheckpointer(
                trainer.output_dir,
                trainer.model,
                trainer.optimizer,
                layout=self.layout,
                keep_checkpoints=trainer.config.keep_checkpoints,
            )
        return self._checkpointer

    def latest_checkpoint(self, output_dir: Path) -> Path | None:
        from mugen.distributed.checkpoint import DCP_METADATA_FILE, latest_distributed_checkpoint
        from mugen.train.checkpoint import LATEST_FILE, MODEL_FILE, checkpoints_dir

        latest = checkpoints_dir(output_dir) / LATEST_FILE
        if latest.is_file():
            named = latest.parent / latest.read_text().strip()
            if (named / MODEL_FILE).is_file() and not (named / DCP_METADATA_FILE).is_file():
                raise MugenError(
                    f"{latest} names a one-process checkpoint; resume it on one process, or start the parallel run "
                    f"from its weights with --init-from {output_dir} and a new --output"
                )
        return latest_distributed_checkpoint(output_dir)

    def save(self, trainer: Trainer) -> Path:
        state = trainer._training_state()
        # The optimizer is saved sharded with the model, and every rank's RNG beside it.
        for name in ("optimizer", "rng", "extra"):
            state.pop(name)
        return self.checkpointer(trainer).save(trainer.step, state).wait()

    def load(self, trainer: Trainer, checkpoint: Path) -> dict:
        state = self.checkpointer(trainer).load(checkpoint)  # model + optimizer in place, RNG on the same world size
        state["extra"] = {}
        return state


class ParallelRun:
    """The mesh and layout of one run on several processes, and what `train_dit` asks of them."""

    def __init__(self, config, device: str):
        from mugen.distributed import build_mesh, data_parallel_rank

        self.config = config
        device_type = "cuda" if str(device).startswith("cuda") else "cpu"
        self.owns_process_group = not dist.is_initialized()
        self.mesh = build_mesh(config, device_type=device_type)
        self.device = f"cuda:{torch.cuda.current_device()}" if device_type == "cuda" else "cpu"
        self.dp_index, self.dp_count = data_parallel_rank(self.mesh)
        self.layout = {axis: size for axis, size in zip(self.mesh.mesh_dim_names, self.mesh.shape)}
        self.is_main = dist.get_rank() == 0
        log.info("rank %d of %d: layout %s, data-parallel group %d of %d", dist.get_rank(), dist.get_world_size(), self.layout, self.dp_index, self.dp_count)

    def build_model(self, model_config, build_single_device: Callable[[], nn.Module]) -> nn.Module:
        """The model on the meta device, parallelized, with the weights ``build_single_device()`` makes on rank 0."""
        from mugen.distributed import initialize_from_single_device, parallelize_dit
        from mugen.models.dit import MUGDiT

        with torch.device("meta"):
            model = MUGDiT(model_config)
        model = parallelize_dit(model, self.mesh, self.config)
        initialize_from_single_device(model, build_single_device, self.device)
        return model

    def wrap_task(self, task) -> DataParallelShare:
        return DataParallelShare(task, self.dp_index, self.dp_count)

    def strategy(self) -> DistributedStrategy:
        return DistributedStrategy(self.mesh, self.layout)

    def flop_counter(self, counter):
        """FLOPs per process: the global micro-batch's split evenly over every rank."""
        world = dist.get_world_size()

        def per_rank(batch: dict) -> tuple[float, float]:
            model_flops, hardware_flops = counter(batch)
            return model_flops / world, hardware_flops / world

        return per_rank

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def parallel_run_for(spec) -> ParallelRun | None:
    """The ParallelRun of a `train_dit` spec, or None for the single-process run; checks unsupported options."""
    autocast = spec.train.mixed_precision == "bf16" or (spec.train.mixed_precision == "auto" and str(spec.device).startswith("cuda"))
    config = parallel_config(spec.parallel, job_world_size(), autocast)
    if config is None:
        return None
    unsupported = [
        flag
        for flag, used in (
            ("--balanced", spec.balanced),
            ("--ema-decay", spec.ema_decay is not None),
            ("--snapshot-every", bool(spec.snapshot_every)),
        )
        if used
    ]
    if unsupported:
        raise MugenError(f"{', '.join(unsupported)}: not available on several processes yet; drop it or train on one process")
    smallest = min(size for size in (spec.batch_size, spec.image_batch_size) if size)
    if smallest < config.data_parallel_size:
        raise MugenError(
            f"batch size {smallest} is smaller than the {config.data_parallel_size} data-parallel ranks of --parallel; "
            "each rank needs at least one sample of every micro-batch: raise --batch-size/--image-batch-size"
        )
    if config.pp > 1:  # pipeline stages: train/pipeline_run.py
        from mugen.train.pipeline_run import PipelineRun

        return PipelineRun(config, spec.device, (spec.batch_size, spec.image_batch_size))
    return ParallelRun(config, spec.device)
