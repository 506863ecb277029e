"""A `mugen train dit` run driven by a multi-stage curriculum (seed §4.2.2).

The training config's ``curriculum`` section::

    "curriculum": {
        "stages": [...],                      # as mugen.train.curriculum.CurriculumConfig.from_dict reads them
        "validation_manifest": "held_out/manifest.parquet",
        "validation_every": 500,              # steps between validation losses (plateau transitions)
        "validation_samples": 64,             # held-out samples used (the first N rows)
        "validation_levels": 8,               # fixed noise levels per sample (mugen.train.validation)
        "batches_per_epoch": 1000             # only sets how often the sampler's epoch counter turns
    }

How a step is made:

* ``CurriculumBatchSampler`` draws each batch's source manifest with the schedule's current
  probabilities (images share the annealed image ratio, videos the rest, each split by weight),
  then a shape bucket of that manifest (in proportion to its size), then the batch's samples.
  Batch ``b`` uses a generator seeded with ``(seed, b)``; before yielding the first micro-batch of
  step ``s`` the sampler moves the schedule to ``s`` steps, so a step count transition takes effect
  at exactly that step.
* ``CurriculumDiTTask`` sets the stage's first-frame masking probability on the flow task and logs
  the stage, image ratio and image share of every step (``history`` / metrics.jsonl).
* After every ``validation_every`` steps the held-out loss (``flow_validation_loss``: fixed noise,
  fixed noise levels) is reported to the schedule; ``plateau_patience`` reports without improvement
  end the stage.

The schedule's state and the validation log are saved in every checkpoint (Trainer ``extra_state``),
so a run resumed mid-stage continues the same schedule and gives the same losses as an
uninterrupted one. The sampler reads the schedule live, so the DataLoader must not read ahead:
curriculum runs use ``num_workers = 0``.

On several processes (torchrun + ``--parallel`` / a ``parallel`` section; seed §5.1) the run is
the plain parallel run of distributed_run.py with the same curriculum on every rank: each rank
keeps the whole schedule and sampler (same seed, so the same global batches and stage
transitions), takes its data-parallel rows of every batch (``DataParallelShare``), and computes
the whole validation loss; rank 0's value is broadcast so every rank makes the same plateau
decision. The curriculum state (a small JSON dict) is saved in the sharded checkpoint's training
state, so the run resumes on any dp_shard/tp/cp layout. Only rank 0 writes ``curriculum.json``,
``curriculum.png`` and the logs.

On pipeline stages (pp > 1, alone or with dp_shard/tp inside the stages; ``pipeline_run.py``) the
same holds; the task's ``draw_inputs`` gives ``PipelineShare`` each step's inputs under the
stage's first-frame masking and ``step_metrics`` its logged stage values, and the validation loss
runs the same held-out rows forward through the stages (``pipeline_run.pipeline_validation_loss``),
so the plateau decisions are the single-process run's. The checkpoint resumes with or without
stages.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mugen.atomic import write_text_atomically
from mugen.errors import MugenError
from mugen.train.curriculum import CurriculumConfig, CurriculumSchedule
from mugen.train.trainer import LossOutput

log = logging.getLogger(__name__)

CURRICULUM_LOG_FILE = "curriculum.json"
CURRICULUM_PLOT_FILE = "curriculum.png"


@dataclass
class CurriculumRunConfig:
    """The ``curriculum`` section of a training config (see the module docstring)."""

    curriculum: CurriculumConfig
    validation_manifest: str | None = None
    validation_every: int = 0
    validation_samples: int = 64
    validation_levels: int = 8
    batches_per_epoch: int = 1000

    @classmethod
    def from_dict(cls, record: dict) -> CurriculumRunConfig:
        if not isinstance(record, dict):
            raise MugenError(f"config section 'curriculum' must be a dict with 'stages', got {type(record).__name__}")
        known = {"stages", "validation_manifest", "validation_every", "validation_samples", "validation_levels", "batches_per_epoch"}
        unknown = sorted(set(record) - known)
        if unknown:
            raise MugenError(f"config section 'curriculum': unknown keys {unknown}; known keys are {sorted(known)}")
        values = {key: record[key] for key in known - {"stages"} if key in record}
        config = cls(curriculum=CurriculumConfig.from_dict({"stages": record.get("stages")}), **values)
        if not isinstance(config.validation_every, int) or config.validation_every < 0:
            raise MugenError(f"curriculum: validation_every={config.validation_every!r} must be a whole number >= 0 (0 = no validation)")
        for key in ("validation_samples", "validation_levels", "batches_per_epoch"):
            if not isinstance(getattr(config, key), int) or getattr(config, key) < 1:
                raise MugenError(f"curriculum: {key}={getattr(config, key)!r} must be a whole number >= 1")
        plateau_stages = [stage.name for stage in config.curriculum.stages if stage.plateau_patience is not None]
        if plateau_stages and not (config.validation_every and config.validation_manifest):
            raise MugenError(
                f"curriculum: stages {plateau_stages} end on a validation plateau but no validation is configured; "
                "set validation_manifest and validation_every"
            )
        if config.validation_every and not config.validation_manifest:
            raise MugenError("curriculum: validation_every is set but validation_manifest is not; name the held-out manifest")
        return config

    def manifests(self) -> list[str]:
        """Every manifest the stages name, in order of first appearance."""
        seen: dict[str, None] = {}
        for stage in self.curriculum.stages:
            for path in stage.manifests:
                seen.setdefault(path, None)
        return list(seen)


class MultiManifestDataset(Dataset):
    """The samples of several manifests behind one index (manifest ``m``'s row ``i`` is ``offsets[m] + i``)."""

    def __init__(self, manifests: list[str], cache_in_memory: bool = False):
        from mugen.data.datasets import LatentTextDataset

        self.paths = list(manifests)
        self.parts = []
        for path in self.paths:
            if not Path(path).is_file():
                raise MugenError(f"curriculum: manifest {path} does not exist; run `mugen encode` for it or fix the path")
            self.parts.append(LatentTextDataset(path, cache_in_memory=cache_in_memory))
        self.offsets = np.cumsum([0] + [len(part) for part in self.parts]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return part, index - self.offsets[part]

    def __getitem__(self, index: int) -> dict:
        part, local = self.locate(index)
        item = self.parts[part][local]
        item["index"] = index
        return item

    def members(self) -> dict[str, dict[Hashable, list[int]]]:
        """{manifest path: {shape key: global indices}}."""
        grouped: dict[str, dict[Hashable, list[int]]] = {}
        for path, part, offset in zip(self.paths, self.parts, self.offsets):
            groups = grouped.setdefault(path, {})
            for local, key in enumerate(part.shape_keys()):
                groups.setdefault(key, []).append(offset + local)
        return grouped


class CurriculumBatchSampler:
    """Batches whose source manifest follows the schedule's probabilities at the current step.

    Batch ``b`` (counted over the whole run: ``epoch * batches_per_epoch + batches_done``) belongs
    to step ``b // grad_accum``. Everything it draws comes from a generator seeded with
    ``(seed, b)``, so ``(epoch, batches_done)`` plus the schedule state is the whole state.
    """

    def __init__(
        self,
        schedule: CurriculumSchedule,
        members: dict[str, dict[Hashable, list[int]]],
        batch_size: int,
        seed: int = 0,
        grad_accum: int = 1,
        batches_per_epoch: int = 1000,
        image_batch_size: int | None = None,
    ):
        if batch_size < 1:
            raise MugenError(f"CurriculumBatchSampler: batch_size={batch_size} must be at least 1")
        self.schedule = schedule
        self.members = members
        self.batch_size = int(batch_size)
        self.image_batch_size = int(image_batch_size or batch_size)
        self.seed = int(seed)
        self.grad_accum = int(grad_accum)
        self.batches_per_epoch = int(batches_per_epoch)
        self.epoch = 0
        self.batches_done = 0

    def sync_schedule(self, steps_done: int) -> None:
        """Advance the schedule to ``steps_done`` steps (it lags after skipped non-finite steps)."""
        behind = steps_done - self.schedule.total_steps
        if behind < 0:
            raise MugenError(
                f"curriculum: the schedule is at step {self.schedule.total_steps} but training is at {steps_done}; "
                "the checkpoint's curriculum state does not match its data position"
            )
        if behind:
            self.schedule.advance(behind)

    def batch(self, global_batch: int) -> list[int]:
        """The sample indices of batch ``global_batch`` under the schedule's current state."""
        probabilities = self.schedule.source_probabilities()
        paths = list(probabilities)
        weights = np.array([probabilities[path] for path in paths], dtype=np.float64)
        rng = np.random.default_rng([self.seed, int(global_batch)])
        path = paths[int(rng.choice(len(paths), p=weights / weights.sum()))]
        groups = self.members[path]
        keys = list(groups)
        sizes = np.array([len(groups[key]) for key in keys], dtype=np.float64)
        key = keys[int(rng.choice(len(keys), p=sizes / sizes.sum()))]
        pool = groups[key]
        size = self.image_batch_size if isinstance(key, tuple) and key and key[0] == "image" else self.batch_size
        return [int(i) for i in rng.choice(pool, size=min(size, len(pool)), replace=False)]

    def __iter__(self):
        while self.batches_done < self.batches_per_epoch:
            global_batch = self.epoch * self.batches_per_epoch + self.batches_done
            if global_batch % self.grad_accum == 0:
                self.sync_schedule(global_batch // self.grad_accum)
            indices = self.batch(global_batch)
            self.batches_done += 1
            yield indices

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done = int(epoch), 0

    def state_dict(self, batches_done: int | None = None) -> dict:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done if batches_done is None else int(batches_done),
            "seed": self.seed,
            "batches_per_epoch": self.batches_per_epoch,
            "manifests": list(self.members),
        }

    def load_state_dict(self, state: dict) -> None:
        current = self.state_dict()
        for name in ("seed", "batches_per_epoch", "manifests"):
            if state.get(name) != current[name]:
                raise MugenError(
                    f"CurriculumBatchSampler.load_state_dict: saved {name}={state.get(name)!r} but this run has "
                    f"{current[name]!r}; resume with the same curriculum and seed"
                )
        self.seek(state["epoch"], state["batches_done"])

    def seek(self, epoch: int, batches_done: int) -> None:
        if not 0 <= int(batches_done) <= self.batches_per_epoch:
            raise MugenError(f"CurriculumBatchSampler.seek: batches_done={batches_done} is outside 0..{self.batches_per_epoch}")
        self.epoch, self.batches_done = int(epoch), int(batches_done)


class CurriculumDiTTask:
    """The flow task with the current stage's first-frame masking (seed §4.2.2: on from stage 2)."""

    def __init__(self, flow_task, schedule: CurriculumSchedule):
        self.flow_task = flow_task
        self.schedule = schedule

    def compute_loss(self, model: nn.Module, batch: dict, generator: torch.Generator, rows: slice | None = None) -> LossOutput:
        """``rows``: this data-parallel rank's samples of the batch (``DataParallelShare``); None = all."""
        self.flow_task.config.first_frame_cond_prob = self.schedule.first_frame_cond_prob()
        output = self.flow_task.compute_loss(model, batch, generator, **({} if rows is None else {"rows": rows}))
        output.metrics.update(self.step_metrics(batch))
        return output

    def draw_inputs(self, batch: dict, generator: torch.Generator, default_fps: float | None, rows: slice | None = None):
        """The flow task's inputs under the current stage's first-frame masking (pipeline stages:
        ``pipeline_run.PipelineShare`` draws them, then adds ``step_metrics``)."""
        self.flow_task.config.first_frame_cond_prob = self.schedule.first_frame_cond_prob()
        return self.flow_task.draw_inputs(batch, generator, default_fps, rows)

    def step_metrics(self, batch: dict) -> dict[str, float]:
        """The stage, image ratio, image share and first-frame masking of this micro-batch's step."""
        kinds = batch.get("kinds") or []
        return {
            "curriculum_stage": float(self.schedule.stage_index),
            "image_ratio": self.schedule.image_ratio(),
            "image_share": sum(kind == "image" for kind in kinds) / max(1, len(kinds)),
            "first_frame_cond_prob": self.schedule.first_frame_cond_prob(),
        }


def padded_validation_groups(samples: list[dict]) -> list[list[dict]]:
    """Group held-out samples by latent shape, captions padded to one length per group."""
    groups: dict[tuple, list[dict]] = {}
    for item in samples:
        groups.setdefault(tuple(item["latents"].shape), []).append(item)
    padded = []
    for items in groups.values():
        length = max(item["text_states"].shape[0] for item in items)
        group = []
        for item in items:
            states = torch.zeros(length, item["text_states"].shape[1], dtype=item["text_states"].dtype)
            mask = torch.zeros(length, dtype=torch.bool)
            states[: item["text_states"].shape[0]] = item["text_states"]
            mask[: item["text_mask"].shape[0]] = item["text_mask"]
            group.append({**item, "text_states": states, "text_mask": mask})
        padded.append(group)
    return padded


class CurriculumProgress:
    """What a curriculum run checkpoints: the schedule and the validation log; runs validation."""

    def __init__(
        self,
        schedule: CurriculumSchedule,
        sampler: CurriculumBatchSampler,
        run: CurriculumRunConfig,
        task_config,
        output_dir,
        is_main: bool = True,
        distributed: bool = False,
        validation_loss_fn=None,
    ):
        """``is_main``: this process writes ``curriculum.json``; ``distributed``: every rank takes rank 0's validation loss.

        ``validation_loss_fn(model, samples, **options)``: computes one group's held-out loss as
        ``mugen.train.validation.flow_validation_loss`` does (the default); a pipeline run passes
        ``PipelineRun.validation_loss``, which runs the same rows through its stages.
        """
        self.schedule = schedule
        self.sampler = sampler
        self.run = run
        self.task_config = task_config
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.distributed = distributed
        self.validation_loss_fn = validation_loss_fn
        self.validation_log: list[dict] = []
        self.groups: list[list[dict]] = []
        if run.validation_every:
            from mugen.data.datasets import LatentTextDataset

            if not Path(run.validation_manifest).is_file():
                raise MugenError(f"curriculum: validation_manifest {run.validation_manifest} does not exist; give the held-out manifest")
            held_out = LatentTextDataset(run.validation_manifest)
            self.groups = padded_validation_groups([held_out[i] for i in range(min(len(held_out), run.validation_samples))])

    def validation_loss(self, model: nn.Module) -> float:
        from mugen.train.validation import flow_validation_loss

        compute = self.validation_loss_fn or flow_validation_loss
        total, count = 0.0, 0
        for group in self.groups:
            loss = compute(
                model,
                group,
                num_levels=self.run.validation_levels,
                spatial_factor=self.task_config.spatial_factor,
                shift_base_resolution=self.task_config.shift_base_resolution,
            )
            total += loss * len(group)
            count += len(group)
        return total / count

    def on_step_end(self, step: int, model: nn.Module) -> None:
        self.sampler.sync_schedule(step)
        if self.run.validation_every and step % self.run.validation_every == 0:
            stage = self.schedule.stage.name
            loss = self.validation_loss(model)
            if self.distributed:
                loss = rank0_value(loss, next(model.parameters()).device)
            transitioned = self.schedule.report_validation_loss(loss)
            entry = {"step": step, "stage": stage, "validation_loss": loss, "plateau_transition": transitioned}
            self.validation_log.append(entry)
            log.info("curriculum step %d (%s): validation loss %.5f%s", step, stage, loss, "; plateau, next stage" if transitioned else "")
            self.write_log()

    def write_log(self) -> None:
        if not self.is_main:
            return
        record = {"schedule": self.schedule.state_dict(), "current_stage": self.schedule.stage.name, "validation": self.validation_log}
        write_text_atomically(self.output_dir / CURRICULUM_LOG_FILE, json.dumps(record, indent=2) + "\n")

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "validation_log": list(self.validation_log)}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.validation_log = list(state["validation_log"])


def rank0_value(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (a collective): decisions taken from it agree across ranks."""
    import torch.distributed as dist

    shared = torch.tensor([value], dtype=torch.float64, device=device)  # (1,)
    dist.broadcast(shared, src=0)
    return float(shared)


def train_dit_curriculum(spec, curriculum: dict | CurriculumRunConfig, resume: bool = True) -> list[dict]:
    """Train MUG-DiT through the curriculum; ``spec`` is a `DiTRunSpec` (its ``manifest`` is unused).

    Writes the run folder of `mugen train dit` plus ``curriculum.json`` (schedule state and
    validation losses). Returns the Trainer's history; each record holds ``curriculum_stage``,
    ``image_ratio``, ``image_share`` and ``first_frame_cond_prob`` of its step. On several
    processes (``spec.parallel`` / torchrun) see the module docstring.
    """
    import dataclasses

    from mugen.data.datasets import collate_latent_batch
    from mugen.models.dit.io import write_run_config
    from mugen.train.distributed_run import parallel_run_for
    from mugen.train.runs import WeightAverages, build_run_model, dit_run_setup
    from mugen.train.tasks import DiTFlowTask
    from mugen.train.trainer import Trainer

    run = curriculum if isinstance(curriculum, CurriculumRunConfig) else CurriculumRunConfig.from_dict(curriculum)
    if spec.train.num_workers:
        raise MugenError(
            f"curriculum run: num_workers={spec.train.num_workers}; the curriculum sampler follows the schedule live, "
            "so batches cannot be drawn ahead; set train.num_workers to 0"
        )
    if spec.train.prefetch:
        # The sampler follows the schedule live, so no batch may be drawn before the step that uses it.
        log.info("curriculum run: background prefetch off (train.prefetch %d -> 0)", spec.train.prefetch)
        spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, prefetch=0))
    manifests = run.manifests()
    dataset = MultiManifestDataset(manifests, cache_in_memory=spec.cache_in_memory)
    config, null_text, run_record = dit_run_setup(spec, dataset[0], manifests[0])
    run_record["curriculum"] = {**run.curriculum.to_dict(), **{k: v for k, v in dataclasses.asdict(run).items() if k != "curriculum"}}
    parallel = parallel_run_for(spec)  # None: one process
    is_main = parallel is None or parallel.is_main
    if is_main:
        write_run_config(spec.output_dir, run_record)

    model = build_run_model(spec, config, parallel)
    schedule = CurriculumSchedule(run.curriculum)
    sampler = CurriculumBatchSampler(
        schedule, dataset.members(), spec.batch_size, seed=spec.train.seed, grad_accum=spec.train.grad_accum,
        batches_per_epoch=run.batches_per_epoch, image_batch_size=spec.image_batch_size,
    )
    task_config = dataclasses.replace(spec.task)  # the task's first-frame probability follows the stage
    progress = CurriculumProgress(
        schedule, sampler, run, task_config, spec.output_dir, is_main=is_main, distributed=parallel is not None,
        validation_loss_fn=None if parallel is None else parallel.validation_loss,
    )
    averages_class = WeightAverages if parallel is None else parallel.weight_averages
    averages = averages_class(spec.output_dir, run_record, spec.ema_decay, spec.snapshot_every, spec.power_ema_sigma_rels)

    def on_step_end(step: int, trained: nn.Module) -> None:
        averages.on_step_end(step, trained)
        progress.on_step_end(step, trained)

    task = CurriculumDiTTask(DiTFlowTask(task_config, null_text), schedule)
    if parallel is not None:
        task = parallel.wrap_task(task, sampler)  # this data-parallel group's rows of every global batch
    trainer = Trainer(
        model, task, dataset, sampler, collate_latent_batch,
        spec.train, spec.output_dir, device=spec.device if parallel is None else parallel.device, resume=resume,
        extra_state=lambda: {**averages.states(), "curriculum": progress},
        on_step_end=on_step_end,
        strategy=None if parallel is None else parallel.strategy(),
    )
    averages.attach(trainer.model)
    try:
        history = trainer.fit()
        if is_main:
            progress.write_log()
            stage_names = [stage.name for stage in run.curriculum.stages]
            write_curriculum_png(history, progress.validation_log, stage_names, Path(spec.output_dir) / CURRICULUM_PLOT_FILE)
        averages.export_ema()  # on several processes a collective: before the process group goes
    finally:
        if parallel is not None:
            parallel.close()
    return history


def write_curriculum_png(history: list[dict], validation_log: list[dict], stage_names: list[str], path: Path) -> Path:
    """Training and validation loss over steps, with the image ratio and the stage boundaries (atomic)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mugen.atomic import write_atomically

    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    losses, schedule = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    steps = [record["step"] for record in history if not record.get("skipped")]
    losses.plot(steps, [record["loss"] for record in history if not record.get("skipped")], color="tab:blue", alpha=0.4, linewidth=0.8, label="training loss")
    if validation_log:
        losses.plot([v["step"] for v in validation_log], [v["validation_loss"] for v in validation_log], "o-", color="tab:red", label="validation loss")
    losses.set_ylabel("loss")
    losses.legend(loc="upper right")
    schedule.plot([r["step"] for r in history], [r.get("image_ratio", 0.0) for r in history], color="tab:green", label="image ratio")
    schedule.plot([r["step"] for r in history], [r.get("first_frame_cond_prob", 0.0) for r in history], color="tab:purple", label="first-frame masking")
    schedule.set_ylim(-0.05, 1.05)
    schedule.set_xlabel("optimizer step")
    schedule.legend(loc="upper right")
    previous = None
    for record in history:  # a vertical line where each stage starts
        stage = int(record.get("curriculum_stage", 0))
        if stage != previous:
            for axes in (losses, schedule):
                axes.axvline(record["step"], color="gray", linestyle=":", linewidth=1)
            losses.text(record["step"], 1.0, f" {stage_names[stage]}", transform=losses.get_xaxis_transform(), fontsize=8, va="top")
            previous = stage
    for axes in (losses, schedule):
        axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
