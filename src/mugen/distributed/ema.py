"""Online EMA of a parallelized MUG-DiT: sharded like the parameters, saved in the DCP checkpoint (seed §4.2.3).

``mugen.train.ema.EMA`` built *after* ``parallelize_dit`` clones each parameter as it is: under
FSDP2 (and TP) a DTensor with the parameter's mesh and placements, so every rank holds only its
shard of the average and ``update`` is a local ``lerp_`` with no communication::

    model = parallelize_dit(MUGDiT(config), mesh, parallel_config)
    ema = EMA(model, decay=0.9999)
    checkpointer = EMACheckpointer(output_dir, model, optimizer, ema=ema)
    ...
    optimizer.step(); ema.update(model)
    checkpointer.save(step, training_state)        # model + optimizer + EMA shards, one DCP checkpoint
    checkpointer.load()                            # restores the EMA too (on any layout)
    save_sharded_ema_weights(ema, model, "ema.safetensors")   # gathered, single-device names and rows

The EMA shards go into the checkpoint under ``ema/<parameter name>`` in single-device coordinates
(fused [q|k|v] rows in the official order, like the model's), so a checkpoint saved on one layout
restores the EMA on another.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mugen import __version__
from mugen.distributed.checkpoint import (  # the checkpointer's helpers: the EMA's shards go through the same path
    _TMP_PREFIX,
    DCP_METADATA_FILE,
    RNG_DIR,
    TRAIN_KEY,
    DistributedCheckpointer,
    PendingSave,
    _canonical_view,
    _checkpoint_tensor,
    _CopyToCPU,
    _drop_empty,
    _training_state_dicts,
    _training_state_json,
    latest_distributed_checkpoint,
)
from mugen.distributed.tensor_parallel import FUSED_ROWS_ATTRIBUTE, canonical_rows
from mugen.errors import MugenError
from mugen.train.checkpoint import META_FILE, restore_rng_state, step_dir_name
from mugen.train.ema import EMA

EMA_KEY = "ema"
_EMA_SCALARS = "ema_scalars"  # decay, warmup, updates: kept in the JSON training state


def ema_checkpoint_view(ema: EMA, model: nn.Module) -> dict:
    """{name: the shadow in single-device coordinates}, sharing storage with the shadow (DCP loads in place)."""
    fused_rows = getattr(model, FUSED_ROWS_ATTRIBUTE, {})
    return _drop_empty({name: _checkpoint_tensor(shadow, fused_rows.get(name)) for name, shadow in ema.shadow.items()})


class EMACheckpointer(DistributedCheckpointer):
    """``DistributedCheckpointer`` that also saves and restores a (sharded) EMA in the same checkpoint.

    ``save`` and ``load`` follow the parent's step by step, with the EMA's shards added to the DCP
    state (the parent has no hook for extra tensors; keep the two in step when either changes).
    """

    def __init__(self, output_dir, model: nn.Module, optimizer=None, ema: EMA | None = None, async_save: bool = False,
                 layout: dict | None = None, keep_checkpoints: int = 0):
        super().__init__(output_dir, model, optimizer, async_save=async_save, layout=layout, keep_checkpoints=keep_checkpoints)
        if ema is None:
            raise MugenError("EMACheckpointer: pass ema=EMA(model, ...) built after parallelize_dit; use DistributedCheckpointer without one")
        self.ema = ema

    def _view(self) -> tuple[dict, dict]:
        fused_rows = getattr(self.model, FUSED_ROWS_ATTRIBUTE, {})
        state = _training_state_dicts(self.model, self.optimizer)
        view = _canonical_view(state, fused_rows)
        view[EMA_KEY] = ema_checkpoint_view(self.ema, self.model)
        return state, view

    def save(self, step: int, training_state: dict | None = None) -> PendingSave:
        """Checkpoint model, optimizer, EMA shards, ``training_state`` and RNG after ``step`` steps."""
        if self.pending is not None:
            self.pending.wait()
        final_dir = self.root / step_dir_name(step)
        temp_dir = self.root / f"{_TMP_PREFIX}{final_dir.name}"
        if dist.get_rank() == 0:
            shutil.rmtree(temp_dir, ignore_errors=True)  # left by a killed save
            (temp_dir / RNG_DIR).mkdir(parents=True)
        dist.barrier()
        _, view = self._view()
        scalars = {"decay": self.ema.decay, "warmup": self.ema.warmup, "updates": self.ema.updates}
        view[TRAIN_KEY] = _training_state_json(step, {**(training_state or {}), _EMA_SCALARS: scalars})
        model_config = getattr(getattr(self.model, "config", None), "to_dict", None)
        meta = {
            "step": step,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mugen_version": __version__,
            "world_size": dist.get_world_size(),
            "layout": self.layout,
            "format": "torch.distributed.checkpoint",
            "model_config": model_config() if model_config else None,
            "ema": scalars,
        }
        if self.async_save:
            future = dcp.async_save(view, checkpoint_id=str(temp_dir), process_group=self._save_group, async_stager=_CopyToCPU())
            self.pending = PendingSave(final_dir, temp_dir, future, meta, self.keep_checkpoints)
            return self.pending
        dcp.save(view, checkpoint_id=str(temp_dir))
        pending = PendingSave(final_dir, temp_dir, None, meta, self.keep_checkpoints)
        pending.wait()
        return pending

    def load(self, checkpoint_dir: str | os.PathLike | None = None, restore_rng: bool = True) -> dict | None:
        """Load model, optimizer and EMA in place; returns the training state (without the EMA's scalars)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else latest_distributed_checkpoint(self.root.parent)
        if checkpoint_dir is None:
            return None
        if not (checkpoint_dir / DCP_METADATA_FILE).is_file():
            raise MugenError(f"checkpoint: {checkpoint_dir} is not a complete distributed checkpoint (no {DCP_METADATA_FILE})")
        state, view = self._view()
        view[TRAIN_KEY] = ""  # DCP replaces the object with the saved one
        try:
            dcp.load(view, checkpoint_id=str(checkpoint_dir))
        except Exception as error:  # noqa: BLE001 - DCP raises several kinds for missing keys
            if "ema" in str(error):
                raise MugenError(
                    f"checkpoint: {checkpoint_dir} holds no EMA ({error.__class__.__name__}); it was saved without one; "
                    "load it with DistributedCheckpointer and start the EMA from the weights"
                ) from error
            raise
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        rng_file = checkpoint_dir / RNG_DIR / f"rank_{dist.get_rank():05d}.pt"
        saved_world = json.loads((checkpoint_dir / META_FILE).read_text()).get("world_size")
        if restore_rng and saved_world == dist.get_world_size() and rng_file.is_file():
            restore_rng_state(torch.load(rng_file, weights_only=True))
        training_state = json.loads(view[TRAIN_KEY])
        scalars = training_state.pop(_EMA_SCALARS)
        self.ema.decay, self.ema.warmup, self.ema.updates = float(scalars["decay"]), bool(scalars["warmup"]), int(scalars["updates"])
        return training_state


def gathered_ema_state_dict(ema: EMA, model: nn.Module) -> dict[str, Tensor]:
    """The EMA as single-device tensors (a collective: every rank must call it), fused rows in official order."""
    fused_rows = getattr(model, FUSED_ROWS_ATTRIBUTE, {})
    full = {}
    for name, shadow in ema.shadow.items():
        tensor = shadow.full_tensor() if isinstance(shadow, DTensor) else shadow
        tensor = tensor.detach().to("cpu").clone()
        if name in fused_rows:
            tensor = canonical_rows(tensor, fused_rows[name])
        full[name] = tensor
    return full


def save_sharded_ema_weights(ema: EMA, model: nn.Module, path: str | os.PathLike) -> Path | None:
    """Gather the EMA and write it on rank 0 as a safetensors file single-device code loads (collective)."""
    from safetensors.torch import save_file

    from mugen.atomic import write_atomically

    full = gathered_ema_state_dict(ema, model)
    path = Path(path)
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda temporary: save_file({k: v.contiguous() for k, v in full.items()}, str(temporary)))
    dist.barrier()
    return path if dist.get_rank() == 0 else None
