"""A generic training loop with exact resume.

The loop knows nothing about diffusion: a ``TrainTask`` turns (model, batch, generator) into a
loss. ``train/tasks.py`` implements it for MUG-DiT (rectified flow) and the Video VAE.

What the loop guarantees:

* Exact resume. The data position (sampler epoch and batches consumed), optimizer, scheduler,
  global RNG states and the step counter are checkpointed, and the randomness of every micro-batch
  comes from its own generator seeded by ``(config.seed, step, micro_index)``: noise and flow times
  do not depend on where a run was interrupted. Running N steps in one go and resuming half-way
  give bitwise identical losses on the CPU.
* Non-finite steps never touch the weights. If any micro-batch loss or the gradient norm is NaN
  or Inf, the gradients are dropped and neither the optimizer nor its moments move. The step
  counter, the data position *and the LR schedule* still advance: a bad batch is a lost batch, and
  the learning rate stays a function of the step number (the rate logged for step s is always the
  schedule's value at s). More than ``max_nonfinite_steps`` such steps stop the run.
* Checkpoints are atomic (see ``checkpoint.py``) and written every ``checkpoint_every`` steps and
  at the end.
* Data arrives through a background ``PrefetchLoader`` (``config.prefetch`` batches ahead; seed
  §5.2). Every step logs the time it waited for data as a fraction of the step time
  (``data_wait_fraction``, goal < 2%), and, given a ``flop_counter``, the model TFLOP/s per GPU and
  the MFU against the datasheet peak (``mugen.train.flops``). With a ``BalancedBatchSampler`` the data
  position is one global counter (resumable on another world size) and the step's cost imbalance
  across ranks and micro-batches is logged.

Step numbering: the k-th optimizer step has index ``k - 1`` (used for the LR schedule and the
micro-batch seeds) and is reported as ``step = k``; ``checkpoints/step_{k:08d}`` holds the state
after k steps.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mugen.data.balanced import BalancedBatchSampler
from mugen.data.loader import PrefetchLoader, move_to_device
from mugen.data.sampling import ShapeBucketBatchSampler
from mugen.errors import MugenError
from mugen.train.checkpoint import (
    LATEST_FILE,
    capture_rng_state,
    checkpoints_dir,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from mugen.train.flops import datasheet_peak_tflops, throughput_metrics
from mugen.train.lr_schedule import build_lr_lambda
from mugen.train.metrics_log import MetricsLogger, write_loss_curve_png

MIXED_PRECISION_MODES = ("auto", "bf16", "no")
LOSS_CURVE_FILE = "loss_curve.png"
_LOADER_STREAM = 2**32  # third seed word of DataLoader generators; micro-batch indices never reach it
# Config fields that do not change the numbers a run computes (allowed to change on resume).
_BOOKKEEPING_FIELDS = {
    "steps", "log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "timestep_bins", "prefetch", "peak_tflops"
}


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    decay: str = "cosine"  # "cosine", "linear" or "constant" (see lr_schedule.py)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "auto"  # "auto" = bf16 autocast on CUDA, fp32 elsewhere; "bf16"; "no"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500  # 0 = only the final checkpoint
    keep_checkpoints: int = 2  # 0 keeps all
    max_nonfinite_steps: int = 5  # skipped NaN/Inf steps tolerated in a run; one more stops it
    timestep_bins: int = 10
    num_workers: int = 0
    prefetch: int = 2  # batches loaded ahead on a background thread; 0 loads in the training thread
    peak_tflops: float = 0.0  # MFU denominator per GPU; 0 = datasheet bf16 peak of a known GPU (none on CPU)

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"steps={self.steps} must be at least 1"),
            (self.seed >= 0, f"seed={self.seed} must be >= 0"),
            (self.lr > 0, f"lr={self.lr} must be positive"),
            (self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be at least 1"),
            (self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)"),
            (
                self.mixed_precision in MIXED_PRECISION_MODES,
                f"mixed_precision={self.mixed_precision!r} must be one of {MIXED_PRECISION_MODES}",
            ),
            (self.log_every >= 1, f"log_every={self.log_every} must be at least 1"),
            (self.checkpoint_every >= 0, f"checkpoint_every={self.checkpoint_every} must be >= 0"),
            (self.keep_checkpoints >= 0, f"keep_checkpoints={self.keep_checkpoints} must be >= 0"),
            (self.max_nonfinite_steps >= 0, f"max_nonfinite_steps={self.max_nonfinite_steps} must be >= 0"),
            (self.timestep_bins >= 1, f"timestep_bins={self.timestep_bins} must be at least 1"),
            (self.num_workers >= 0, f"num_workers={self.num_workers} must be >= 0"),
            (self.prefetch >= 0, f"prefetch={self.prefetch} must be >= 0 (0 disables the background loader)"),
            (self.peak_tflops >= 0, f"peak_tflops={self.peak_tflops} must be >= 0 (0 = datasheet peak)"),
        ]
        for ok, message in checks:
            if not ok:
                raise MugenError(f"TrainConfig: {message}")
        build_lr_lambda(self.warmup_steps, self.steps, self.decay, self.min_lr_ratio)  # validates the schedule


@dataclass
class LossOutput:
    loss: Tensor  # scalar to backprop (already reduced, mean over the micro-batch)
    per_sample: Tensor | None = None  # (B,) detached per-sample losses, for timestep-bin logging
    timesteps: Tensor | None = None  # (B,) in [0, 1], the flow time of each sample
    metrics: dict[str, float] = field(default_factory=dict)


class TrainTask(Protocol):
    def compute_loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> LossOutput: ...


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


def derived_seed(*values: int) -> int:
    """A 63-bit seed that depends only on ``values`` (non-negative ints), mixed by NumPy's SeedSequence."""
    state = np.random.SeedSequence([int(value) for value in values]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def micro_batch_seed(seed: int, step_index: int, micro_index: int) -> int:
    """Seed of a micro-batch's generator: its noise and flow times do not depend on resume."""
    return derived_seed(seed, step_index, micro_index)


class SingleProcess:
    """How the Trainer reduces, clips, saves and restores on one process (the default strategy).

    ``mugen.train.distributed_run.DistributedStrategy`` replaces it on several processes (an
    all-reduced loss, DTensor-aware clipping, sharded checkpoints, logs on rank 0 only).
    """

    is_main = True  # this process writes logs, metrics and the loss curve

    def loss_value(self, loss: Tensor) -> float:
        """The micro-batch loss as logged (the whole batch's mean)."""
        return float(loss.detach())

    def clip_grad_norm(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))

    def latest_checkpoint(self, output_dir: Path) -> Path | None:
        latest = checkpoints_dir(output_dir) / LATEST_FILE
        if latest.is_file() and (latest.parent / latest.read_text().strip() / ".metadata").is_file():  # DCP's index file
            raise MugenError(
                f"{latest} names a sharded checkpoint of a run on several processes; resume it with torchrun and "
                "--parallel (any layout), or start a one-process run from its weights in a new --output"
            )
        return latest_checkpoint(output_dir)

    def save(self, trainer: "Trainer") -> Path:
        return save_checkpoint(
            trainer.output_dir,
            trainer.step,
            trainer.model,
            trainer._training_state(),
            meta={"config": asdict(trainer.config)},
            keep_checkpoints=trainer.config.keep_checkpoints,
        )

    def load(self, trainer: "Trainer", checkpoint: Path) -> dict:
        """Load the weights into ``trainer.model``; return the saved training state."""
        return load_checkpoint(checkpoint, trainer.model, strict=True)


class Trainer:
    """AdamW + LambdaLR loop over shape-bucketed batches with gradient accumulation and clipping.

    ``extra_state``: a callable returning ``{name: object with state_dict/load_state_dict}``
    (e.g. an EMA) saved into and restored from every checkpoint.
    ``on_step_end``: called as ``on_step_end(step, model)`` after every applied optimizer step
    (e.g. to update an EMA); not called for skipped steps.
    ``flop_counter``: ``flop_counter(batch) -> (model_flops, hardware_flops)`` of one micro-batch
    (e.g. ``mugen.train.flops.DiTStepFlops``); enables the TFLOP/s and MFU logs.
    ``batch_sampler``: a ``ShapeBucketBatchSampler`` (position = epoch, batches consumed) or a
    ``BalancedBatchSampler`` (position = global units consumed; its ``micro_batches`` must equal
    ``config.grad_accum``).
    ``strategy``: how the loss is reduced, gradients clipped, checkpoints saved/restored and who logs;
    ``SingleProcess`` by default, ``distributed_run.DistributedStrategy`` on several processes.
    """

    def __init__(
        self,
        model: nn.Module,
        task: TrainTask,
        dataset,
        batch_sampler: ShapeBucketBatchSampler | BalancedBatchSampler,
        collate_fn,
        config: TrainConfig,
        output_dir,
        device="cpu",
        resume: bool = True,
        extra_state: Callable[[], dict[str, Stateful]] | None = None,
        on_step_end: Callable[[int, nn.Module], None] | None = None,
        flop_counter: Callable[[dict], tuple[float, float]] | None = None,
        strategy: SingleProcess | None = None,
    ):
        config.validate()
        self.strategy = strategy or SingleProcess()
        self._stream_sampler = bool(getattr(batch_sampler, "is_stream", False))
        if self._stream_sampler and batch_sampler.micro_batches != config.grad_accum:
            raise MugenError(
                f"Trainer: the balanced sampler plans {batch_sampler.micro_batches} micro-batches per rank and step but "
                f"grad_accum={config.grad_accum}; build the sampler with micro_batches=grad_accum"
            )
        if len(batch_sampler) == 0:
            raise MugenError(
                "Trainer: the batch sampler yields no batches (every bucket is smaller than its batch size "
                "with drop_last=True); lower the batch size or set drop_last=False"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.task = task
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.collate_fn = collate_fn
        self.config = config
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.extra_state = extra_state
        self.on_step_end = on_step_end
        self.flop_counter = flop_counter
        self.peak_tflops = config.peak_tflops or datasheet_peak_tflops(self.device)

        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        if not trainable:
            raise MugenError("Trainer: the model has no parameters with requires_grad=True; nothing to train")
        self._trainable = trainable
        # The fused CUDA kernel does the whole update in one launch; measured 120 ms faster per step
        # than the default for the 1B preset on an H100 (benchmarks/results/dit_1b_train_step.md).
        self.optimizer = torch.optim.AdamW(
            trainable,
            lr=config.lr,
            betas=tuple(config.betas),
            eps=config.eps,
            weight_decay=config.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, build_lr_lambda(config.warmup_steps, config.steps, config.decay, config.min_lr_ratio)
        )
        self.autocast_enabled = config.mixed_precision == "bf16" or (
            config.mixed_precision == "auto" and self.device.type == "cuda"
        )

        self.step = 0  # optimizer steps done
        self.nonfinite_steps = 0
        self.last_nonfinite_step: int | None = None
        self.history: list[dict] = []
        # Data position as consumed by training (the prefetch loader and workers read ahead of it).
        if self._stream_sampler:
            self._data_position = batch_sampler.position
        else:
            self._data_epoch = batch_sampler.epoch
            self._data_batches_done = batch_sampler.batches_done

    # ------------------------------------------------------------------------------- checkpoint
    def _training_state(self) -> dict:
        extra = {name: item.state_dict() for name, item in (self.extra_state() if self.extra_state else {}).items()}
        if self._stream_sampler:
            sampler_state = self.batch_sampler.state_dict(position=self._data_position)
        else:
            sampler_state = self.batch_sampler.state_dict(batches_done=self._data_batches_done)
            sampler_state["epoch"] = self._data_epoch
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": sampler_state,
            "rng": capture_rng_state(),
            "config": asdict(self.config),
            "nonfinite_steps": self.nonfinite_steps,
            "last_nonfinite_step": self.last_nonfinite_step,
            "history": self.history,
            "extra": extra,
        }

    def save(self) -> Path:
        return self.strategy.save(self)

    def _restore(self, checkpoint: Path) -> None:
        state = self.strategy.load(self, checkpoint)
        current_config = asdict(self.config)
        changed = [
            name
            for name, value in state["config"].items()
            if name not in _BOOKKEEPING_FIELDS
            and name in current_config
            and _as_list(value) != _as_list(current_config[name])
        ]
        if changed:
            warnings.warn(
                f"resuming {checkpoint} with changed config fields {changed}; the new values apply from here on "
                "and losses will differ from an uninterrupted run",
                stacklevel=2,
            )
        if "optimizer" in state:  # a sharded checkpoint loads the optimizer in place (distributed_run.py)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_config_to_optimizer()
        self.batch_sampler.load_state_dict(state["sampler"])
        if self._stream_sampler:
            self._data_position = self.batch_sampler.position
        else:
            self._data_epoch = self.batch_sampler.epoch
            self._data_batches_done = self.batch_sampler.batches_done
        self.step = int(state["step"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.last_nonfinite_step = state["last_nonfinite_step"]
        self.history = list(state["history"])
        if self.extra_state is not None:
            items = self.extra_state()
            missing = [name for name in items if name not in state["extra"]]
            if missing:
                raise MugenError(f"Trainer: checkpoint {checkpoint} has no saved state for {missing}; resume=False starts over")
            for name, item in items.items():
                item.load_state_dict(state["extra"][name])
        if "rng" in state:
            restore_rng_state(state["rng"])

    def _apply_config_to_optimizer(self) -> None:
        """After loading optimizer/scheduler state, let this run's config set the hyper-parameters.

        The saved param groups hold the previous run's lr, betas, eps and weight decay, and the
        learning rate the previous schedule gave; this run's schedule (its ``steps`` may differ)
        takes over at the restored step. With an unchanged config nothing changes.
        """
        multiplier = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.scheduler.base_lrs = [self.config.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group.update(
                initial_lr=self.config.lr,
                lr=self.config.lr * multiplier,
                betas=tuple(self.config.betas),
                eps=self.config.eps,
                weight_decay=self.config.weight_decay,
            )

    # ------------------------------------------------------------------------------------- data
    def _data_loader(self, loader_seed: int) -> DataLoader:
        # A generator of its own, so worker seeding does not draw from the global RNG and the
        # global stream is the same whether or not the run was resumed. (Randomness inside
        # Dataset.__getitem__ is not covered: keep datasets deterministic.)
        return DataLoader(
            self.dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.collate_fn,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(loader_seed),
        )

    def _batch_source(self) -> Iterator[dict]:
        """Collated batches forever from the consumed position on (runs ahead of training when prefetched)."""
        if self._stream_sampler:
            self.batch_sampler.seek_position(self._data_position)
            yield from self._data_loader(derived_seed(self.config.seed, self._data_position, _LOADER_STREAM))
            return
        epoch, batches_done = self._data_epoch, self._data_batches_done
        while True:
            self.batch_sampler.seek(epoch, batches_done)
            yield from self._data_loader(derived_seed(self.config.seed, epoch, _LOADER_STREAM))
            epoch, batches_done = epoch + 1, 0

    def _consumed_batch(self, micro_index: int) -> None:
        """Advance the data position by one micro-batch that training took."""
        if self._stream_sampler:
            if micro_index == self.config.grad_accum - 1:  # a global step's units are consumed together
                self._data_position += self.batch_sampler.units_per_step
            return
        self._data_batches_done += 1
        if self._data_batches_done >= len(self.batch_sampler):
            self._data_epoch += 1
            self._data_batches_done = 0

    # ------------------------------------------------------------------------------------ steps
    def _autocast(self):
        if not self.autocast_enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _train_step(self, batches: PrefetchLoader, logger: MetricsLogger) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's record."""
        step_start = time.perf_counter()
        data_wait = 0.0
        model_flops = hardware_flops = 0.0
        config = self.config
        balance = self.batch_sampler.step_plan(self._data_position) if self._stream_sampler else None
        step_index = self.step
        lr = self.optimizer.param_groups[0]["lr"]
        total_loss = 0.0
        nonfinite = False
        metric_sums: dict[str, float] = {}
        per_sample_losses: list[Tensor] = []
        sample_timesteps: list[Tensor] = []
        sample_ids: list = []
        num_samples = 0

        self.optimizer.zero_grad(set_to_none=True)
        for micro_index in range(config.grad_accum):
            batch = next(batches)
            data_wait += batches.last_wait_s
            self._consumed_batch(micro_index)
            batch = move_to_device(batch, self.device)
            if self.flop_counter is not None:
                flops = self.flop_counter(batch)
                model_flops += flops[0]
                hardware_flops += flops[1]
            if isinstance(batch, dict) and "sample_ids" in batch:
                ids = batch["sample_ids"]
                sample_ids.extend(ids.tolist() if isinstance(ids, Tensor) else list(ids))
            generator = torch.Generator(device=self.device).manual_seed(
                micro_batch_seed(config.seed, step_index, micro_index)
            )
            with self._autocast():
                output = self.task.compute_loss(self.model, batch, generator)
            loss_value = self.strategy.loss_value(output.loss)
            if not math.isfinite(loss_value):
                nonfinite = True  # no backward: the step is dropped anyway
            else:
                # Mean over micro-batches: each contributes 1/grad_accum of the gradient.
                (output.loss / config.grad_accum).backward()
            total_loss += loss_value / config.grad_accum
            for name, value in output.metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + float(value) / config.grad_accum
            if output.per_sample is not None and output.timesteps is not None:
                per_sample_losses.append(output.per_sample.detach())
                sample_timesteps.append(output.timesteps.detach())
                num_samples += int(output.per_sample.numel())

        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        grad_norm = self.strategy.clip_grad_norm(self._trainable, max_norm)
        nonfinite = nonfinite or not math.isfinite(grad_norm)

        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)  # the weights and Adam moments stay untouched
            self.nonfinite_steps += 1
            self.last_nonfinite_step = step_index + 1
            where = f"; sample_ids {sample_ids[:16]}" if sample_ids else ""
            logger.warn(
                f"step {step_index + 1}: non-finite loss {total_loss} or grad norm {grad_norm}; step skipped "
                f"({self.nonfinite_steps}/{config.max_nonfinite_steps} allowed){where}"
            )
            if self.nonfinite_steps > config.max_nonfinite_steps:
                raise MugenError(
                    f"training stopped: {self.nonfinite_steps} non-finite losses (last at step {step_index + 1}); "
                    f"lower the learning rate or check the data (last batch sample_ids: {sample_ids[:16] or 'n/a'}); "
                    f"the newest checkpoint is in {self.output_dir / 'checkpoints'}"
                )
        else:
            self.optimizer.step()
        self.scheduler.step()  # advances on skipped steps too: the LR is a function of the step number
        self.step += 1
        if not nonfinite and self.on_step_end is not None:
            self.on_step_end(self.step, self.model)

        record = {"step": self.step, "loss": total_loss, "lr": lr, "grad_norm": grad_norm, "skipped": nonfinite}
        if num_samples:
            record["samples"] = num_samples
        step_time = time.perf_counter() - step_start
        record.update(step_time_s=step_time, data_wait_s=data_wait, data_wait_fraction=data_wait / max(step_time, 1e-12))
        if self.flop_counter is not None:
            record.update(model_flops=model_flops, hardware_flops=hardware_flops)
            record.update(throughput_metrics(model_flops, hardware_flops, step_time, self.peak_tflops))
        if balance is not None:
            record.update(rank_cost_imbalance=balance.rank_imbalance, micro_batch_cost_imbalance=balance.micro_batch_imbalance)
        record.update(metric_sums)
        logger.log_step(record, per_sample_losses if not nonfinite else (), sample_timesteps if not nonfinite else ())
        return record

    # -------------------------------------------------------------------------------------- fit
    def fit(self) -> list[dict]:
        """Train up to ``config.steps`` optimizer steps; returns one record per step of the whole run."""
        config = self.config
        checkpoint = self.strategy.latest_checkpoint(self.output_dir) if self.resume else None
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            random.seed(config.seed)
            np.random.seed(config.seed % 2**32)
            torch.manual_seed(config.seed)

        if self.step >= config.steps:
            if self.strategy.is_main:
                write_loss_curve_png(self.history, self.output_dir / LOSS_CURVE_FILE)
            return self.history

        self.model.train()
        logger = MetricsLogger(
            self.output_dir,
            total_steps=config.steps,
            start_step=self.step,
            log_every=config.log_every,
            timestep_bins=config.timestep_bins,
            peak_tflops=self.peak_tflops,
        ) if self.strategy.is_main else _SilentLogger()
        batches = PrefetchLoader(self._batch_source(), device=self.device, depth=config.prefetch)
        try:
            while self.step < config.steps:
                self.history.append(self._train_step(batches, logger))
                if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.step < config.steps:
                    self.save()
            self.save()
        finally:
            batches.close()
            logger.close(self.step)
        if self.strategy.is_main:
            write_loss_curve_png(self.history, self.output_dir / LOSS_CURVE_FILE)
        return self.history


class _SilentLogger:
    """The logger of the ranks other than the main one: rank 0 writes the logs of a parallel run."""

    def log_step(self, *args, **kwargs) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def close(self, step: int) -> None:
        pass


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value
