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
restores the EMA on another. ``AveragesCheckpointer`` does the same for several named averages
(the online EMA and the power-function EMAs of `mugen train dit --snapshot-every`, each under its
own name). ``save_gathered_weights`` writes the gathered weights of the model or of an average in
the file format of the single-process run (``mugen.train.ema.save_averaged_weights``), on rank 0.
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


def _average_scalars(average: EMA) -> dict:
    """An average's state without its tensors (decay, warm-up, update count; sigma_rel/gamma of a power EMA)."""
    return {key: value for key, value in average.state_dict().items() if key != "shadow"}


class AveragesCheckpointer(DistributedCheckpointer):
    """``DistributedCheckpointer`` that also saves and restores named (sharded) weight averages.

    ``averages``: {name: EMA or PowerFunctionEMA built after ``parallelize_dit``}. Each average's
    shards go into the DCP state under ``<name>.<parameter name>`` in single-device coordinates (a
    run saved on one layout resumes on another); their scalars go into the JSON training state.
    """

    def __init__(self, output_dir, model: nn.Module, optimizer=None, averages: dict[str, EMA] | None = None,
                 async_save: bool = False, layout: dict | None = None, keep_checkpoints: int = 0):
        super().__init__(output_dir, model, optimizer, async_save=async_save, layout=layout, keep_checkpoints=keep_checkpoints)
        if not averages:
            raise MugenError(
                "AveragesCheckpointer: pass averages={name: EMA(model, ...)} built after parallelize_dit; "
                "use DistributedCheckpointer without any"
            )
        not_averages = sorted(name for name, average in averages.items() if not isinstance(average, EMA))
        if not_averages:
            raise MugenError(
                f"AveragesCheckpointer: {not_averages} are not weight averages (mugen.train.ema.EMA); "
                "only those are checkpointed sharded"
            )
        self.averages = dict(averages)

    def extra_tensors_view(self) -> dict:
        return {name: ema_checkpoint_view(average, self.model) for name, average in self.averages.items()}

    def extra_scalars(self) -> dict:
        return {name: _average_scalars(average) for name, average in self.averages.items()}

    def restore_extra_scalars(self, scalars: dict) -> None:
        for name, average in self.averages.items():
            # The shadow was loaded in place by DCP; load_state_dict checks the rest (e.g. a power EMA's sigma_rel).
            average.load_state_dict({**scalars[name], "shadow": dict(average.shadow)})

    def load(self, checkpoint_dir: str | os.PathLike | None = None, restore_rng: bool = True) -> dict | None:
        """Load model, optimizer and averages in place; returns the training state (without the averages' scalars)."""
        import torch.distributed.checkpoint as dcp

        from mugen.distributed.checkpoint import DCP_METADATA_FILE, latest_distributed_checkpoint

        path = Path(checkpoint_dir) if checkpoint_dir is not None else latest_distributed_checkpoint(self.root.parent)
        if path is not None and (path / DCP_METADATA_FILE).is_file():
            saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
            missing = [name for name in self.averages if not any(key.startswith(f"{name}.") for key in saved)]
            if missing:
                raise MugenError(
                    f"checkpoint {path} holds no {', '.join(missing)}: it was saved without them; resume with the "
                    "averaging options it was trained with, or start a new run from its weights (--init-from)"
                )
        return super().load(path, restore_rng)


class EMACheckpointer(AveragesCheckpointer):
    """``DistributedCheckpointer`` that also saves and restores one (sharded) EMA, under ``ema.<name>``."""

    def __init__(self, output_dir, model: nn.Module, optimizer=None, ema: EMA | None = None, async_save: bool = False,
                 layout: dict | None = None, keep_checkpoints: int = 0):
        if ema is None:
            raise MugenError("EMACheckpointer: pass ema=EMA(model, ...) built after parallelize_dit; use DistributedCheckpointer without one")
        super().__init__(output_dir, model, optimizer, averages={EMA_KEY: ema}, async_save=async_save, layout=layout,
                         keep_checkpoints=keep_checkpoints)
        self.ema = ema


def gathered_tensors(named: dict[str, Tensor], model: nn.Module, on_every_rank: bool = True) -> dict[str, Tensor]:
    """Single-device CPU copies of ``named`` (parameter names of ``model``): a collective, every rank calls it.

    DTensors are gathered one at a time; fused projections come back in the official [q|k|v] row
    order. With ``on_every_rank=False`` only rank 0 keeps the copies (the others get {} and never
    hold more than one gathered tensor).
    """
    fused_rows = getattr(model, FUSED_ROWS_ATTRIBUTE, {})
    keep = on_every_rank or dist.get_rank() == 0
    full = {}
    for name, tensor in named.items():
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if not keep:
            continue
        tensor = tensor.detach().to("cpu").clone()
        if name in fused_rows:
            tensor = canonical_rows(tensor, fused_rows[name])
        full[name] = tensor
    return full


def gathered_ema_state_dict(ema: EMA, model: nn.Module, on_every_rank: bool = True) -> dict[str, Tensor]:
    """The EMA as single-device tensors (a collective: every rank must call it), fused rows in official order."""
    return gathered_tensors(ema.shadow, model, on_every_rank)


def gathered_model_weights(model: nn.Module, on_every_rank: bool = True) -> dict[str, Tensor]:
    """The parallelized model's parameters and buffers as single-device tensors (collective)."""
    return gathered_tensors(EMA._named_tensors(model), model, on_every_rank)


def save_gathered_weights(full: dict[str, Tensor], model: nn.Module, path: str | os.PathLike) -> Path:
    """Write gathered weights (keyed by parameter/buffer name) as the single-process run's model file.

    Names and tied aliases follow ``model.state_dict()``, like ``mugen.train.ema.save_averaged_weights``
    and the checkpoints' ``model.safetensors``, so ``load_model_weights`` / ``load_dit`` read it.
    Written atomically; call it on one rank.
    """
    import json

    from safetensors.torch import save_file

    from mugen.atomic import write_atomically
    from mugen.train.checkpoint import _ALIASES_KEY

    source_of = {id(tensor): name for name, tensor in EMA._named_tensors(model).items()}
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    stored_as: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        source = source_of.get(id(tensor), name)
        if source not in full:
            raise MugenError(
                f"save_gathered_weights: state dict entry {name} is not among the gathered weights; "
                "gather the model's own tensors"
            )
        if source in stored_as:  # tied weights: stored once
            aliases[name] = stored_as[source]
            continue
        tensors[name] = full[source].contiguous()
        stored_as[source] = name
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata={_ALIASES_KEY: json.dumps(aliases)}))


def save_sharded_ema_weights(ema: EMA, model: nn.Module, path: str | os.PathLike) -> Path | None:
    """Gather the EMA and write it on rank 0 as a safetensors file single-device code loads (collective)."""
    full = gathered_ema_state_dict(ema, model, on_every_rank=False)
    if dist.get_rank() == 0:
        save_gathered_weights(full, model, path)
    dist.barrier()
    return Path(path) if dist.get_rank() == 0 else None
