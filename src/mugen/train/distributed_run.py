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
* ``--balanced`` (seed §5.2): every rank reads the global step of the single-process balanced run
  (micro-batches of near-equal cost, one shape each) and ``BalancedDataParallelShare`` splits each
  micro-batch's rows so every data-parallel rank's step cost is within one sample's cost of the
  others' (``mugen.data.balanced.split_rows``), weighted so the gradient stays the single-process
  run's. The sampler's state is the global position, so a run resumes exactly on any layout.
  Not used: the sampler's own per-rank plan (``world_size`` = data-parallel ranks, whole
  micro-batches per rank). It would change the global step (dp x grad_accum micro-batches) and the
  per-micro-batch random seeds, so the run would not reproduce the single-process one; and FSDP
  syncs every micro-batch layer by layer, so equal rows of each micro-batch per rank is the balance
  that removes waiting. A micro-batch with fewer rows than ranks (a bucket's last one) leaves some
  ranks a zero-weight row (computed, times 0).
* ``--ema-decay`` / ``--snapshot-every`` (seed §4.2.3): ``ShardedWeightAverages`` keeps the online
  EMA and the power-function EMAs as DTensors beside the parameter shards (updated locally after
  every optimizer step), saves them in the sharded checkpoint (``AveragesCheckpointer``: resumed on
  any layout), and gathers them to rank 0 for the files of the single-process run
  (``snapshots/step_*``, ``ema/``): `mugen posthoc-ema`, `mugen generate` and ``load_dit`` read them
  unchanged.

Tested on gloo/CPU against the single-process run (tests/distributed/test_distributed_train.py,
test_distributed_train_averages.py, test_distributed_train_balanced.py, test_distributed_train_pipeline.py,
test_distributed_train_pipeline_averages.py, test_distributed_train_curriculum.py): dp_shard, tp, cp,
dp_shard x tp, cp x tp, gradient accumulation, resume on the same or another layout, EMA and snapshots
(dp_shard, tp, resumed), balanced batches (dp_shard, resumed), pipeline stages (``PipelineRun`` of
pipeline_run.py: pp, pp x dp_shard, pp x tp, resumed with or without stages), and with stages --balanced
(pp, pp x dp_shard, resumed without stages) and EMA / snapshots (pp, pp x dp_shard, pp x tp, resumed on pp
and on dp_shard). With pipeline stages, ``PipelineWeightAverages`` keeps each stage's averages beside its
shards, saves them in the stage's sharded checkpoint and sends them stage by stage to rank 0 for the
single-process files, and ``--balanced`` splits each micro-batch's rows by cost as above, padding each
data-parallel share to a multiple of ``pp_microbatches`` with zero-weight rows.

Curricula (``train_dit_curriculum``, seed §4.2.2) run on dp_shard/tp/cp layouts: every rank keeps the whole
schedule and sampler (the same global batches and stage transitions), takes its rows of each batch, and uses
rank 0's validation loss for plateau decisions; the curriculum state (stage, plateau tracking, sampler
position) is saved as JSON in the sharded checkpoint's training state, so a run resumes exactly on any
layout, and only rank 0 writes ``curriculum.json`` / ``curriculum.png``. On pipeline stages (pp, alone or with
dp_shard/tp inside the stages) the curriculum task's ``draw_inputs`` gives ``PipelineShare`` each step's inputs
under the stage's first-frame masking, the held-out loss runs forward through the stages
(``pipeline_run.pipeline_validation_loss``, the rows of ``flow_validation_loss``), and the curriculum state rides
in the stage checkpoints' training state, so a run resumes with or without stages (tested: pp, pp x dp_shard,
resumed from pp on dp_shard and the reverse, with EMA from pp on dp_shard). Every rank reads the whole global batch (simple and deterministic;
the data-loading cost is repeated per rank), and the per-timestep loss bins and ``samples`` in the
logs are rank 0's share.
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
from mugen.train.runs import WeightAverages
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
        elif isinstance(default, float):
            try:
                values[key] = float(raw)
            except ValueError:
                raise MugenError(f"--parallel {text!r}: {key}={raw!r} must be a number") from None
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
        return None  # a one-rank layout is the single-process run (its block options: apply_block_options)
    return config


def apply_block_options(model: nn.Module, values: dict | None) -> None:
    """One process: the per-block options of a ``--parallel`` layout applied to ``model.blocks`` on its device.

    Activation checkpointing ("selective"/"full") and per-block compile (``compile_blocks``, with
    ``compile_memory_budget``) do not need several processes; the axis sizes must then all be 1.
    """
    from mugen.distributed.activation import apply_activation_checkpointing, compile_blocks
    from mugen.distributed.mesh import ParallelConfig
    from mugen.train.runs import dataclass_from_dict

    if not values:
        return
    config = dataclass_from_dict(ParallelConfig, dict(values), "--parallel / config section 'parallel'")
    config.validate(1)
    apply_activation_checkpointing(model.blocks, config.activation_checkpointing)
    if config.compile_blocks:
        compile_blocks(model.blocks, memory_budget=config.compile_memory_budget)
    log.info(
        "one process: activation checkpointing %s, per-block compile %s (memory budget %s)",
        config.activation_checkpointing, config.compile_blocks, config.compile_memory_budget,
    )


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


class BalancedRowSplit:
    """The rows of each micro-batch of a ``--balanced`` global step, split by cost over the data-parallel ranks (seed §5.2).

    Every rank reads the global step of the single-process balanced run (``BalancedBatchSampler``
    with ``world_size=1``: its micro-batches of near-equal cost, one shape each). Each micro-batch's
    rows are split with ``mugen.data.balanced.split_rows``: equal counts, and the remainder rows go
    to the data-parallel ranks that took the least cost so far in the step, so every rank's step cost
    is within one sample's cost of the others'. Rank ``index`` takes a contiguous block of rows.
    The step boundary is every ``micro_batches`` calls (the Trainer calls once per micro-batch, and a
    resumed run starts on a step boundary). Used by ``BalancedDataParallelShare`` and, with pipeline
    stages, by ``pipeline_run.PipelineShare``.
    """

    def __init__(self, sampler, index: int, count: int, micro_batches: int):
        self.sampler, self.index, self.count, self.micro_batches = sampler, index, count, int(micro_batches)
        self._micro_index = 0
        self._loads = [0.0] * count

    def take(self, batch: dict) -> tuple[int, int, float]:
        """(first row, number of rows of this rank, the step's rank cost imbalance) for the next micro-batch.

        The imbalance (max / mean - 1 of the ranks' step costs) is carried by the step's last
        micro-batch, times ``micro_batches`` (the Trainer averages metrics over the micro-batches),
        and 0 on the others.
        """
        from mugen.data.balanced import imbalance, split_rows

        if "index" not in batch:
            raise MugenError("--balanced on several processes needs batches with dataset indices ('index'); use LatentTextDataset")
        if self._micro_index == 0:
            self._loads = [0.0] * self.count
        batch_size = int(batch["latents"].shape[0])
        row_cost = sum(self.sampler.sample_cost(int(i)) for i in batch["index"].tolist()) / batch_size
        counts = split_rows(batch_size, row_cost, self._loads)
        self._micro_index = (self._micro_index + 1) % self.micro_batches
        step_imbalance = imbalance(self._loads) * self.micro_batches if self._micro_index == 0 else 0.0
        return sum(counts[: self.index]), counts[self.index], step_imbalance


class BalancedDataParallelShare(DataParallelShare):
    """``DataParallelShare`` for ``--balanced`` (seed §5.2): the rows of each micro-batch split by cost.

    ``BalancedRowSplit`` gives this rank's contiguous rows of each micro-batch of the global
    balanced step; its loss is weighted as in ``DataParallelShare``, so the gradient is the
    single-process run's.

    A micro-batch with fewer rows than ranks (a bucket's last micro-batch) leaves some ranks without
    a row: they compute the loss of the first row times 0, so FSDP's collectives still line up (the
    gradient gets exact zeros; only a non-finite loss on that row would differ: it skips the step).
    The step's rank cost imbalance (max / mean - 1) is returned as the metric ``rank_cost_imbalance``
    (replacing the sampler's, which sees one rank).
    """

    def __init__(self, task, index: int, count: int, sampler, micro_batches: int):
        super().__init__(task, index, count)
        self.split = BalancedRowSplit(sampler, index, count, micro_batches)

    def compute_loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> LossOutput:
        start, mine, step_imbalance = self.split.take(batch)
        batch_size = int(batch["latents"].shape[0])
        rows = slice(start, start + mine) if mine else slice(0, 1)
        output = self.task.compute_loss(model, batch, generator, rows=rows)
        output.loss = output.loss * (mine * self.count / batch_size)
        if not mine:  # no sample of this micro-batch: a zero contribution, and nothing to log
            output.per_sample = None if output.per_sample is None else output.per_sample[:0]
            output.timesteps = None if output.timesteps is None else output.timesteps[:0]
        output.metrics = {**output.metrics, "rank_cost_imbalance": step_imbalance}
        return output


class ShardedWeightAverages(WeightAverages):
    """``WeightAverages`` of a parallelized model (seed §4.2.3 on several processes).

    The online EMA and the power-function EMAs are built from the DTensor parameters, so each rank
    keeps only its shards and updates them locally after every optimizer step; they are saved in the
    sharded checkpoint (``AveragesCheckpointer``, via ``DistributedStrategy``). Snapshots and the
    EMA export gather one tensor at a time to rank 0, which writes the files of the single-process
    run (same names, same layout, fused rows in the official order): `mugen posthoc-ema`,
    `mugen generate` and ``load_dit`` use them unchanged. Both are collectives: every rank calls them.
    ``gather`` and ``naming_model`` are what a pipeline run (``pipeline_run.PipelineWeightAverages``) changes.
    """

    def gather(self, named: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        """Single-device CPU copies of ``named`` (tensors of ``model`` or of an average) on rank 0, {} elsewhere (collective)."""
        from mugen.distributed.ema import gathered_tensors

        return gathered_tensors(named, model, on_every_rank=False)

    def naming_model(self, model: nn.Module) -> nn.Module:
        """The module whose state dict gives the written files' names and tied aliases (rank 0)."""
        return model

    def write_snapshot(self, step: int, model) -> Path | None:
        """``snapshots/step_{step:08d}/``: model.safetensors + power_ema_*.safetensors, written by rank 0 atomically."""
        import shutil
        import tempfile

        from mugen.distributed.ema import save_gathered_weights
        from mugen.train.checkpoint import MODEL_FILE, step_dir_name
        from mugen.train.ema import EMA, power_ema_file_name
        from mugen.train.runs import SNAPSHOTS_DIR

        is_main = dist.get_rank() == 0
        root = self.output_dir / SNAPSHOTS_DIR
        final = root / step_dir_name(step)
        temporary = None
        if is_main:
            root.mkdir(parents=True, exist_ok=True)
            temporary = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        try:
            full = self.gather(EMA._named_tensors(model), model)
            if is_main:
                save_gathered_weights(full, self.naming_model(model), temporary / MODEL_FILE)
            del full
            for sigma_rel in self.power_sigma_rels:
                full = self.gather(self.averages[f"power_ema_{sigma_rel:.4f}"].shadow, model)
                if is_main:
                    save_gathered_weights(full, self.naming_model(model), temporary / power_ema_file_name(sigma_rel))
                del full
            if is_main:
                if final.exists():  # written before an interruption: the resumed run rewrites it identically
                    shutil.rmtree(final)
                temporary.rename(final)
        except BaseException:
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
            raise
        dist.barrier()
        return final if is_main else None

    def export_ema(self) -> Path | None:
        """Write ``output_dir/ema`` (model_config.json + model.safetensors) on rank 0, as the single-process run does."""
        from mugen.distributed.ema import save_gathered_weights
        from mugen.models.dit.io import write_run_config
        from mugen.train.checkpoint import MODEL_FILE
        from mugen.train.runs import EMA_DIR

        if "ema" not in self.averages:
            return None
        full = self.gather(self.averages["ema"].shadow, self.model)
        folder = self.output_dir / EMA_DIR
        if dist.get_rank() == 0:
            save_gathered_weights(full, self.naming_model(self.model), folder / MODEL_FILE)
            record = dict(self.run_record)
            record["ema"] = {"decay": self.ema_decay, "updates": self.averages["ema"].updates}
            write_run_config(folder, record)
            log.info("online EMA (decay %s) gathered and exported to %s", self.ema_decay, folder)
        dist.barrier()
        return folder if dist.get_rank() == 0 else None


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

    @staticmethod
    def sharded_extra_state(trainer: Trainer) -> dict:
        """The Trainer's ``extra_state`` items saved as shards beside the weights: the weight averages (EMAs).

        Every other item (e.g. a curriculum's schedule and sampler progress) has a small JSON state,
        the same on every rank, saved inside the checkpoint's training state.
        """
        from mugen.train.ema import EMA

        items = trainer.extra_state() if trainer.extra_state is not None else {}
        return {name: item for name, item in items.items() if isinstance(item, EMA)}

    def checkpointer(self, trainer: Trainer):
        """The sharded checkpointer; with the Trainer's ``extra_state`` (weight averages) an ``AveragesCheckpointer``."""
        from mugen.distributed import DistributedCheckpointer
        from mugen.distributed.ema import AveragesCheckpointer

        if self._checkpointer is None:
            averages = self.sharded_extra_state(trainer)
            common = dict(layout=self.layout, keep_checkpoints=trainer.config.keep_checkpoints)
            if averages:  # EMA shards beside the parameters' (seed §4.2.3)
                self._checkpointer = AveragesCheckpointer(trainer.output_dir, trainer.model, trainer.optimizer, averages=averages, **common)
            else:
                self._checkpointer = DistributedCheckpointer(trainer.output_dir, trainer.model, trainer.optimizer, **common)
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
        # The optimizer and the weight averages are saved sharded with the model, and every rank's RNG beside it.
        for name in ("optimizer", "rng"):
            state.pop(name)
        sharded = self.sharded_extra_state(trainer)
        plain = {name: value for name, value in state.pop("extra").items() if name not in sharded}
        if plain:  # JSON states of the other extras (e.g. the curriculum's) ride in the training state
            state["extra"] = plain
        return self.checkpointer(trainer).save(trainer.step, state).wait()

    def load(self, trainer: Trainer, checkpoint: Path) -> dict:
        checkpointer = self.checkpointer(trainer)
        state = checkpointer.load(checkpoint)  # model, optimizer and averages in place; RNG on the same world size
        averages = getattr(checkpointer, "averages", {})
        restored = {name: average.state_dict() for name, average in averages.items()}  # already restored
        state["extra"] = {**state.get("extra", {}), **restored}
        return state


class ParallelRun:
    """The mesh and layout of one run on several processes, and what `train_dit` asks of them."""

    def __init__(self, config, device: str, micro_batches: int = 1):
        from mugen.distributed import build_mesh, data_parallel_rank

        self.config = config
        self.micro_batches = int(micro_batches)
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

    def wrap_task(self, task, sampler=None) -> DataParallelShare:
        """This data-parallel group's share of every global micro-batch; split by cost with a balanced sampler."""
        if getattr(sampler, "is_stream", False):
            if sampler.world_size != 1:
                raise MugenError(
                    f"the balanced sampler plans {sampler.world_size} ranks; on several processes build it with "
                    "world_size=1, rank=0 (every rank reads the global step, the rows are split per rank)"
                )
            return BalancedDataParallelShare(task, self.dp_index, self.dp_count, sampler, self.micro_batches)
        return DataParallelShare(task, self.dp_index, self.dp_count)

    def weight_averages(self, *args, **kwargs) -> ShardedWeightAverages:
        """``WeightAverages(*args, **kwargs)`` for the parallelized model (sharded, gathered on export)."""
        return ShardedWeightAverages(*args, **kwargs)

    def validation_loss(self, model: nn.Module, samples: list[dict], **options) -> float:
        """``flow_validation_loss(model, samples, **options)`` of the parallelized model (every rank calls it)."""
        from mugen.train.validation import flow_validation_loss

        return flow_validation_loss(model, samples, **options)

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
    # --balanced: batch_size counts samples of the costliest shape (image_batch_size is only a cap there).
    sizes = (spec.batch_size,) if spec.balanced else (spec.batch_size, spec.image_batch_size)
    smallest = min(size for size in sizes if size)
    if smallest < config.data_parallel_size:
        raise MugenError(
            f"batch size {smallest} is smaller than the {config.data_parallel_size} data-parallel ranks of --parallel; "
            "each rank needs at least one sample of every micro-batch: raise --batch-size/--image-batch-size"
        )
    if config.pp > 1:  # pipeline stages: train/pipeline_run.py
        from mugen.train.pipeline_run import PipelineRun

        # --balanced: the micro-batch sizes vary; each data-parallel share is padded to a multiple of
        # pp_microbatches with zero-weight rows instead of being checked here.
        batch_sizes = () if spec.balanced else (spec.batch_size, spec.image_batch_size)
        return PipelineRun(config, spec.device, batch_sizes, micro_batches=spec.train.grad_accum)
    return ParallelRun(config, spec.device, micro_batches=spec.train.grad_accum)
