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

import torch

from mugen.errors import MugenError
from mugen.train.tasks import DiTFlowTask, DiTTaskConfig, VAETask, VAETaskConfig
from mugen.train.trainer import TrainConfig, Trainer

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
    """A JSON file with optional sections "train", "task", "model", "data"."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise MugenError(f"config {path} does not exist; pass a JSON file with sections train/task/model/data")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MugenError(f"config {path} is not valid JSON ({error})") from error
    unknown = sorted(set(record) - {"train", "task", "model", "data"})
    if unknown:
        raise MugenError(f"config {path}: unknown sections {unknown}; use train, task, model, data")
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


def train_dit(spec: DiTRunSpec, resume: bool = True) -> list[dict]:
    from mugen.data.datasets import LatentTextDataset, collate_latent_batch
    from mugen.data.sampling import ShapeBucketBatchSampler
    from mugen.models.dit import MUGDiT, dit_config
    from mugen.models.dit.io import write_run_config
    from mugen.models.text.base import TextFeatures, load_text_features

    manifest = Path(spec.manifest)
    dataset = LatentTextDataset(manifest, cache_in_memory=spec.cache_in_memory)
    if len(dataset) == 0:
        raise MugenError(f"manifest {manifest} lists no samples; run `mugen encode` first")
    first = dataset[0]
    text_dim = first["text_states"].shape[-1]
    latent_channels = first["latents"].shape[0]
    config = dit_config(spec.preset, **{"text_dim": text_dim, "latent_channels": latent_channels, **spec.model_overrides})
    null_path = manifest.parent / "null_text.safetensors"
    if not null_path.is_file():
        raise MugenError(f"{null_path} is missing; `mugen encode` writes it beside the manifest (needed for text dropout)")
    null_states, null_mask = load_text_features(null_path)
    null_text = TextFeatures(null_states[None].float(), null_mask[None])

    write_run_config(
        spec.output_dir,
        {
            "dit": config.to_dict(),
            "preset": spec.preset,
            "text_encoder": spec.text_encoder,
            "vae": spec.vae_dir,
            "manifest": str(manifest),
            "shift_base_resolution": spec.task.shift_base_resolution,
        },
    )
    torch.manual_seed(spec.train.seed)
    model = MUGDiT(config)
    log.info("MUG-DiT %s: %.2fM parameters", spec.preset, model.num_parameters / 1e6)
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

    trainer = Trainer(
        model,
        DiTFlowTask(spec.task, null_text),
        dataset,
        sampler,
        collate_latent_batch,
        spec.train,
        spec.output_dir,
        device=spec.device,
        resume=resume,
        flop_counter=DiTStepFlops(config),
    )
    return trainer.fit()


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
