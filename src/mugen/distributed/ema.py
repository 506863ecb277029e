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

import os
from pathlib import Path

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mugen.distributed.checkpoint import (  # the EMA's shards go through the checkpointer's own path
    DistributedCheckpointer,
    _checkpoint_tensor,
    _drop_empty,
)
from mugen.distributed.tensor_parallel import FUSED_ROWS_ATTRIBUTE, canonical_rows
from mugen.errors import MugenError
from mugen.train.ema import EMA

EMA_KEY = "ema"


def ema_checkpoint_view(ema: EMA, model: nn.Module) -> dict:
    """{name: the shadow in single-device coordinates}, sharing storage with the shadow (DCP loads in place)."""
    fused_rows = getattr(model, FUSED_ROWS_ATTRIBUTE, {})
    return _drop_empty({name: _checkpoint_tensor(shadow, fused_rows.get(name)) for name, shadow in ema.shadow.items()})


class EMACheckpointer(DistributedCheckpointer):
    """``DistributedCheckpointer`` that also saves and restores a (sharded) EMA in the same checkpoint.

    The EMA's shards go into the DCP state beside the model's (in single-device coordinates, so a run
    saved on one layout resumes on another); its decay, warm-up flag and update count go into the JSON
    training state.
    """

    def __init__(self, output_dir, model: nn.Module, optimizer=None, ema: EMA | None = None, async_save: bool = False,
                 layout: dict | None = None, keep_checkpoints: int = 0):
        super().__init__(output_dir, model, optimizer, async_save=async_save, layout=layout, keep_checkpoints=keep_checkpoints)
        if ema is None:
            raise MugenError("EMACheckpointer: pass ema=EMA(model, ...) built after parallelize_dit; use DistributedCheckpointer without one")
        self.ema = ema

    def extra_tensors_view(self) -> dict:
        return {EMA_KEY: ema_checkpoint_view(self.ema, self.model)}

    def extra_scalars(self) -> dict:
        return {"decay": self.ema.decay, "warmup": self.ema.warmup, "updates": self.ema.updates}

    def restore_extra_scalars(self, scalars: dict) -> None:
        self.ema.decay, self.ema.warmup, self.ema.updates = float(scalars["decay"]), bool(scalars["warmup"]), int(scalars["updates"])

    def load(self, checkpoint_dir: str | os.PathLike | None = None, restore_rng: bool = True) -> dict | None:
        """Load model, optimizer and EMA in place; returns the training state (without the EMA's scalars)."""
        try:
            return super().load(checkpoint_dir, restore_rng)
        except Exception as error:  # noqa: BLE001 - DCP raises several kinds for missing keys
            if EMA_KEY in str(error) and not isinstance(error, MugenError):
                raise MugenError(
                    f"checkpoint: {checkpoint_dir or 'the latest step'} holds no EMA ({error.__class__.__name__}); it was "
                    "saved without one; load it with DistributedCheckpointer and start the EMA from the weights"
                ) from error
            raise


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
