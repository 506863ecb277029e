"""Whole training runs for the two models, as used by `mugen train` and `mugen demo`.

Each run writes into one output folder: the Trainer's checkpoints, TensorBoard logs, metrics.jsonl
and loss_curve.png, plus what is needed to use the result later (``model_config.json`` for the DiT,
an exported ``vae/`` folder with latent statistics for the VAE).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mugen.errors import MugenError
from mugen.train.tasks import DiTFlowTask, DiTTaskConfig, VAETask, VAETaskConfig
from mugen.train.trainer import TrainConfig, Trainer

if TYPE_CHECKING:
    from mugen.train.preference import PreferenceTaskConfig

log = logging.getLogger(__name__)


def dataclass_from_dict(cls, values: dict | None, what: str):
    """Build a dataclass from a dict, naming unknown keys (config files are user input)."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MugenError(f"{what}: unknown keys {unknown}; known keys are {sorted(known)}")
    for f in dataclasses.fields(cls):  # JSON gives lists where the dataclass holds tuples
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def load_run_config(path: str | os.PathLike | None) -> dict:
    """A JSON file with optional sections "train", "task", "model", "data", "curriculum" (see curriculum_run.py)
    and "averaging" (``ema_decay``, ``snapshot_every``, ``power_ema_sigma_rels``: see ``DiTRunSpec``)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise MugenError(f"config {path} does not exist; pass a JSON file with sections train/task/model/data")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MugenError(f"config {path} is not valid JSON ({error})") from error
    unknown = sorted(set(record) - {"train", "task", "model", "data", "curriculum", "averaging", "parallel"})
    if unknown:
        raise MugenError(f"config {path}: unknown sections {unknown}; use train, task, model, data, curriculum, averaging, parallel")
    if not isinstance(record.get("parallel", {}), dict):
        raise MugenError(f"config {path}: section 'parallel' must be an object like {{\"dp_shard\": 2, \"tp\": 2}}")
    averaging_keys = sorted(set(record.get("averaging", {})) - {"ema_decay", "snapshot_every", "power_ema_sigma_rels"})
    if averaging_keys:
        raise MugenError(f"config {path}: unknown keys {averaging_keys} in section 'averaging'; use ema_decay, snapshot_every, power_ema_sigma_rels")
    return record


@dataclass
class DiTRunSpec:
    manifest: str
    output_dir: str
    preset: str = "debug"
    model_overrides: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: DiTTaskConfig = field(default_factory=DiTTaskConfig)
    batch_size: int = 8
    image_batch_size: int | None = None  # images are cheaper: a larger batch for their bucket
    device: str = "cpu"
    vae_dir: str | None = None  # recorded for `mugen generate`
    text_encoder: str = "minilm"  # recorded for `mugen generate`; must be what made the features
    cache_in_memory: bool = False  # keep loaded samples in RAM (small datasets)
    # seed §5.2: cost-balanced micro-batches (mugen.data.balanced); batch_size then counts samples of
    # the most expensive shape, cheaper shapes get more, up to max_tokens tokens per micro-batch.
    balanced: bool = False
    max_tokens: int | None = None
    cost_coefficients: tuple[float, float, float] | None = None  # (a, b, c) of a + bN + cN^2; default: DiT FLOPs
    # Start from these weights (a run folder, step folder or `mugen expand` output) with a fresh
    # optimizer, e.g. after parameter expansion (seed §4.2.1) or for SFT on a pre-trained model.
    # Ignored when the output folder already holds a checkpoint (the run resumes from it instead).
    init_from: str | None = None
    # Annealed SFT with post-hoc EMA (seed §4.2.3). ema_decay: keep an online EMA of the weights
    # (checkpointed, exported to ``output_dir/ema`` at the end). snapshot_every > 0: write the raw
    # weights and power-function EMAs of widths ``power_ema_sigma_rels`` to
    # ``output_dir/snapshots/step_*`` every that many steps (never pruned), for `mugen posthoc-ema`.
    ema_decay: float | None = None
    snapshot_every: int = 0
    power_ema_sigma_rels: tuple[float, ...] = (0.05, 0.10)
    # Layout over several processes (``ParallelConfig`` keys, e.g. {"dp_shard": 2, "tp": 2}; seed §5.1),
    # launched by torchrun; see distributed_run.py. None on one process = the single-process run.
    parallel: dict | None = None


EMA_DIR = "ema"
SNAPSHOTS_DIR = "snapshots"


class WeightAverages:
    """The online EMA and the snapshot writer of a DiT run (seed §4.2.3), hooked into the Trainer.

    ``states()`` goes to ``Trainer(extra_state=...)`` so every checkpoint holds the averages and a
    resumed run continues them exactly; ``on_step_end`` updates them and writes a snapshot every
    ``snapshot_every`` steps.
    """

    def __init__(self, output_dir, run_record: dict, ema_decay: float | None, snapshot_every: int, power_sigma_rels):
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise MugenError(f"--ema-decay {ema_decay}: must be between 0 and 1, e.g. 0.999")
        if snapshot_every < 0:
            raise MugenError(f"--snapshot-every {snapshot_every}: must be >= 0 (0 = no snapshots)")
        self.output_dir = Path(output_dir)
        self.run_record = run_record
        self.ema_decay = ema_decay
        self.snapshot_every = int(snapshot_every)
        self.power_sigma_rels = tuple(float(s) for s in power_sigma_rels) if snapshot_every else ()
        self.averages: dict = {}
        self.model = None

    @property
    def enabled(self) -> bool:
        return self.ema_decay is not None or self.snapshot_every > 0

    def attach(self, model) -> None:
        """Build the averages from ``model`` (call after the Trainer moved it to its device)."""
        from mugen.train.ema import EMA, PowerFunctionEMA

        self.model = model
        if self.ema_decay is not None:
            self.averages["ema"] = EMA(model, self.ema_decay)
        for sigma_rel in self.power_sigma_rels:
            self.averages[f"power_ema_{sigma_rel:.4f}"] = PowerFunctionEMA(model, sigma_rel)

    def states(self) -> dict:
        return self.averages

    def on_step_end(self, step: int, model) -> None:
        for average in self.averages.values():
            average.update(model)
        if self.snapshot_every and step % self.snapshot_every == 0:
            self.write_snapshot(step, model)

    def write_snapshot(self, step: int, model) -> Path:
        """``snapshots/step_{step:08d}/``: model.safetensors + power_ema_*.safetensors, atomically."""
        import json
        import shutil
        import tempfile

        from safetensors.torch import save_file

        from mugen.train.checkpoint import _ALIASES_KEY, MODEL_FILE, _tensors_for_safetensors, step_dir_name
        from mugen.train.ema import power_ema_file_name, save_averaged_weights

        root = self.output_dir / SNAPSHOTS_DIR
        root.mkdir(parents=True, exist_ok=True)
        final = root / step_dir_name(step)
        temporary = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        try:
            tensors, aliases = _tensors_for_safetensors(model)
            save_file(tensors, str(temporary / MODEL_FILE), metadata={_ALIASES_KEY: json.dumps(aliases)})
            for sigma_rel in self.power_sigma_rels:
                save_averaged_weights(self.averages[f"power_ema_{sigma_rel:.4f}"], model, temporary / power_ema_file_name(sigma_rel))
            if final.exists():  # written before an interruption: the resumed run rewrites it identically
                shutil.rmtree(final)
            temporary.rename(final)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return final

    def export_ema(self) -> Path | None:
        """Write ``output_dir/ema`` (model_config.json + model.safetensors), a folder `mugen generate` loads."""
        from mugen.models.dit.io import write_run_config
        from mugen.train.checkpoint import MODEL_FILE
        from mugen.train.ema import save_averaged_weights

        if "ema" not in self.averages:
            return None
        folder = self.output_dir / EMA_DIR
        folder.mkdir(parents=True, exist_ok=True)
        save_averaged_weights(self.averages["ema"], self.model, folder / MODEL_FILE)
        record = dict(self.run_record)
        record["ema"] = {"decay": self.ema_decay, "updates": self.averages["ema"].updates}
        write_run_config(folder, record)
        log.info("online EMA (decay %s) exported to %s", self.ema_decay, folder)
        return folder


def initialise_from(model, checkpoint: str | os.PathLike) -> dict:
    """Load the weights of ``checkpoint`` into ``model`` (config must match); returns the source's record."""
    from mugen.models.dit.io import resolve_dit_checkpoint
    from mugen.models.dit.model import MUGDiTConfig
    from mugen.train.checkpoint import load_model_weights

    record, weights = resolve_dit_checkpoint(checkpoint)
    source = MUGDiTConfig.from_dict(record["dit"])
    if source != model.config:
        differing = sorted(k for k, v in source.to_dict().items() if model.config.to_dict().get(k) != v)
        raise MugenError(
            f"--init-from {checkpoint}: its model config differs from this run's in {differing}; "
            "train with the same preset/overrides (after `mugen expand`, use the expanded folder's preset)"
        )
    load_model_weights(model, weights)
    log.info("initialised from %s", weights)
    return record


def dit_run_setup(spec: "DiTRunSpec", first: dict, manifest: str | os.PathLike):
    """The model config for the data's widths, the null caption for text dropout, and the run record.

    ``first`` is one dataset item (its text width and latent channels size the model); the null text
    lives beside ``manifest``, where `mugen encode` writes it. Returns (config, null_text, record).
    """
    from mugen.models.dit import dit_config
    from mugen.models.text.base import TextFeatures, load_text_features

    overrides = {"text_dim": first["text_states"].shape[-1], "latent_channels": first["latents"].shape[0], **spec.model_overrides}
    config = dit_config(spec.preset, **overrides)
    null_path = Path(manifest).parent / "null_text.safetensors"
    if not null_path.is_file():
        raise MugenError(f"{null_path} is missing; `mugen encode` writes it beside the manifest (needed for text dropout)")
    null_states, null_mask = load_text_features(null_path)
    null_text = TextFeatures(null_states[None].float(), null_mask[None])
    record = {
        "dit": config.to_dict(),
        "preset": spec.preset,
        "text_encoder": spec.text_encoder,
        "vae": spec.vae_dir,
        "manifest": str(manifest),
        "shift_base_resolution": spec.task.shift_base_resolution,
    }
    return config, null_text, record


def build_run_model(spec, config, parallel) -> torch.nn.Module:
    """The MUG-DiT of a `train_dit` run: seeded, ``--init-from`` loaded, and laid over the ranks (``parallel``, a
    ``ParallelRun``) or given the layout's block options on one process (``parallel`` None)."""
    from mugen.models.dit import MUGDiT
    from mugen.train.distributed_run import apply_block_options

    def initial_model():
        torch.manual_seed(spec.train.seed)
        model = MUGDiT(config)
        log.info("MUG-DiT %s: %.2fM parameters", spec.preset, model.num_parameters / 1e6)
        if spec.init_from:
            initialise_from(model, spec.init_from)
        return model

    if parallel is not None:
        return parallel.build_model(config, initial_model)
    model = initial_model()
    apply_block_options(model, spec.parallel)  # activation checkpointing / per-block compile on one device
    return model


def train_dit(spec: DiTRunSpec, resume: bool = True) -> list[dict]:
    from mugen.data.datasets import LatentTextDataset, collate_latent_batch
    from mugen.data.sampling import ShapeBucketBatchSampler
    from mugen.models.dit.io import write_run_config
    from mugen.train.distributed_run import parallel_run_for

    manifest = Path(spec.manifest)
    dataset = LatentTextDataset(manifest, cache_in_memory=spec.cache_in_memory)
    if len(dataset) == 0:
        raise MugenError(f"manifest {manifest} lists no samples; run `mugen encode` first")
    first = dataset[0]
    config, null_text, run_record = dit_run_setup(spec, first, manifest)
    parallel = parallel_run_for(spec)  # None: one process
    if parallel is None or parallel.is_main:
        write_run_config(spec.output_dir, run_record)

    model = build_run_model(spec, config, parallel)
    keys = dataset.shape_keys()
    if spec.balanced:
        from mugen.data.balanced import BalancedBatchSampler, SampleCost, dit_tokens_for_shape_key

        sampler = BalancedBatchSampler(
            keys,
            [dit_tokens_for_shape_key(key, config.patch_size) for key in keys],
            SampleCost(*spec.cost_coefficients) if spec.cost_coefficients else SampleCost.for_dit(config, text_tokens=first["text_states"].shape[0]),
            batch_size=spec.batch_size,
            micro_batches=spec.train.grad_accum,
            seed=spec.train.seed,
            max_batch_size=spec.image_batch_size,
            max_tokens=spec.max_tokens,
            world_size=1,  # the global step: on several processes every rank reads it and takes its rows
            rank=0,
        )
        log.info(
            "balanced batches: %s",
            ", ".join(f"{key}: {size}" for key, size in zip(sampler.bucket_keys, sampler.bucket_batch_sizes)),
        )
    else:
        per_key = None
        if spec.image_batch_size:
            per_key = {key: spec.image_batch_size for key in set(keys) if key[0] == "image"}
        sampler = ShapeBucketBatchSampler(keys, spec.batch_size, seed=spec.train.seed, batch_size_for_key=per_key)
    from mugen.train.flops import DiTStepFlops

    averages_class = WeightAverages if parallel is None else parallel.weight_averages
    averages = averages_class(spec.output_dir, run_record, spec.ema_decay, spec.snapshot_every, spec.power_ema_sigma_rels)

    task, flop_counter = DiTFlowTask(spec.task, null_text), DiTStepFlops(config)
    if parallel is not None:
        task, flop_counter = parallel.wrap_task(task, sampler), parallel.flop_counter(flop_counter)
    trainer = Trainer(
        model,
        task,
        dataset,
        sampler,
        collate_latent_batch,
        spec.train,
        spec.output_dir,
        device=spec.device if parallel is None else parallel.device,
        resume=resume,
        flop_counter=flop_counter,
        extra_state=averages.states if averages.enabled else None,
        on_step_end=averages.on_step_end if averages.enabled else None,
        strategy=None if parallel is None else parallel.strategy(),
    )
    averages.attach(trainer.model)
    try:
        history = trainer.fit()
        averages.export_ema()  # on several processes a collective: before the process group goes
    finally:
        if parallel is not None:
            parallel.close()
    return history


@dataclass
class VAERunSpec:
    output_dir: str
    clips: list  # (3, 8n, H, W) tensors in [-1, 1]
    preset: str = "tiny"
    train: TrainConfig = field(default_factory=TrainConfig)
    task: VAETaskConfig = field(default_factory=VAETaskConfig)
    batch_size: int = 4
    device: str = "cpu"


def train_vae(spec: VAERunSpec, resume: bool = True):
    """Train the Video VAE, then estimate latent statistics and export ``output_dir/vae``."""
    from mugen.data.datasets import VideoClipDataset
    from mugen.data.sampling import ShapeBucketBatchSampler
    from mugen.models.vae.model import VideoVAE, estimate_latent_statistics
    from mugen.models.vae.presets import vae_config

    if not spec.clips:
        raise MugenError("no training clips for the VAE; give --data bundled or a folder of videos")
    torch.manual_seed(spec.train.seed)
    model = VideoVAE(vae_config(spec.preset))
    dataset = VideoClipDataset(spec.clips)
    sampler = ShapeBucketBatchSampler(dataset.shape_keys(), spec.batch_size, seed=spec.train.seed)
    trainer = Trainer(
        model, VAETask(spec.task), dataset, sampler, torch.utils.data.default_collate, spec.train, spec.output_dir, device=spec.device, resume=resume
    )
    history = trainer.fit()
    model = trainer.model.eval()
    with torch.no_grad():
        batches = [clip[None].to(trainer.device) for clip in spec.clips[: min(len(spec.clips), 64)]]
        shift, scale = estimate_latent_statistics(model, batches)
        model.set_latent_statistics(shift, scale)
    export_dir = Path(spec.output_dir) / "vae"
    model.to("cpu").save_pretrained(export_dir)
    return history, export_dir


@dataclass
class PreferenceRunSpec:
    """Flow-DPO or Flow-KTO fine-tuning of a trained MUG-DiT (seed §4.2.3).

    The policy starts from ``policy`` (a `mugen train dit` run folder); the frozen reference is the
    same weights unless ``reference`` names another run. Batches of the annotation sources in the
    data are interleaved by ``source_ratios`` (default: equal). A multi-stage schedule is a chain of
    such runs, each starting from (and referencing) the previous stage's output.
    """

    policy: str
    output_dir: str
    kind: str = "dpo"  # "dpo" (better/worse pairs) or "kto" (pass/fail labels)
    manifest: str | None = None  # preference.parquet (mugen.train.preference_data); or pass a dataset
    reference: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    task: PreferenceTaskConfig | None = None
    batch_size: int = 8
    source_ratios: dict | None = None
    device: str = "cpu"


def train_preference(spec: PreferenceRunSpec, dataset=None, resume: bool = True) -> list[dict]:
    """Run one preference stage; writes a run folder `mugen generate` can load."""
    import copy

    from mugen.models.dit.io import load_dit, write_run_config
    from mugen.train.preference import FlowDPOTask, FlowKTOTask, PreferenceTaskConfig
    from mugen.train.preference_data import PreferenceDataset, SourceMixBatchSampler

    if spec.kind not in ("dpo", "kto"):
        raise MugenError(f"preference run: kind={spec.kind!r}; use 'dpo' or 'kto'")
    if dataset is None:
        if spec.manifest is None:
            raise MugenError("preference run: give --manifest (a preference.parquet) with the pairs or labels")
        dataset = PreferenceDataset.from_manifest(spec.manifest)
    if dataset.kind != spec.kind:
        raise MugenError(f"preference run: the data holds {dataset.kind} rows but the run is {spec.kind}; use `mugen train {dataset.kind}`")
    policy, record = load_dit(spec.policy)
    reference_model = policy if spec.reference is None else load_dit(spec.reference)[0]
    reference_model = copy.deepcopy(reference_model).to(spec.device)
    task_config = spec.task or PreferenceTaskConfig(shift_base_resolution=record.get("shift_base_resolution", 512 * 512))
    task = (FlowDPOTask if spec.kind == "dpo" else FlowKTOTask)(reference_model, task_config)
    sources = dataset.sources()
    ratios = spec.source_ratios or {name: 1.0 for name in sorted(set(sources))}
    sampler = SourceMixBatchSampler(sources, dataset.shape_keys(), spec.batch_size, ratios, seed=spec.train.seed)
    new_record = dict(record)
    new_record["preference"] = {
        "kind": spec.kind,
        "policy": str(spec.policy),
        "reference": str(spec.reference or spec.policy),
        "source_ratios": ratios,
        "task": dataclasses.asdict(task_config),
    }
    write_run_config(spec.output_dir, new_record)
    policy.train()
    trainer = Trainer(policy, task, dataset, sampler, dataset.collate, spec.train, spec.output_dir, device=spec.device, resume=resume)
    return trainer.fit()
