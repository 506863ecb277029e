"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), resumable on any layout (seed §5).

Layout (next to the single-process checkpoints of ``train/checkpoint.py``, same naming)::

    output_dir/checkpoints/
        step_00000500/
            .metadata, __0_0.distcp, ...   DCP: model + optimizer shards, written by every rank
            rng/rank_00000.pt ...           each rank's Python/NumPy/torch RNG states
            meta.json                       step, layout, world size, model config, time
        latest                              names the newest complete step directory

Every rank writes its own shards (``dcp.save``; ``dcp.async_save`` in a background thread on its
own gloo group when ``async_save=True``: the state is copied to CPU memory first, training goes on,
``wait()`` finishes it). The files go into ``.tmp-step_...`` and rank 0 renames the directory and
then rewrites ``latest`` only when every rank is done, so a crash leaves the previous checkpoint
set intact.

DCP stores every tensor in its single-device shape and names, chunked by global offsets, so a
checkpoint saved on one layout loads on any other (e.g. dp_shard=4 -> tp=2): each rank reads the
regions it owns. Tensor parallelism keeps fused projections ([q|k|v], [k|v]) in a head-aligned row
order (``tensor_parallel.py``); here their local rows are mapped back to [q|k|v] offsets
(``torch.distributed`` ShardedTensors with one shard per contiguous run), so what is on disk is
always the official order. The training state (step, data position, ...) is stored as one JSON
string (the same on every rank).

``export_checkpoint`` turns a DCP checkpoint into one safetensors file or the official ``dit.pt``
on a single process (no process group needed).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import shutil
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard as LocalShard
from torch.distributed._shard.sharded_tensor import ShardedTensor, ShardedTensorMetadata, TensorProperties
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from mugen import __version__
from mugen.atomic import write_text_atomically
from mugen.distributed.tensor_parallel import FUSED_ROWS_ATTRIBUTE, FusedRows
from mugen.errors import MugenError
from mugen.train.checkpoint import (
    LATEST_FILE,
    META_FILE,
    capture_rng_state,
    checkpoints_dir,
    restore_rng_state,
    step_dir_name,
)

logger = logging.getLogger(__name__)

DCP_METADATA_FILE = ".metadata"
TRAIN_KEY = "train_state_json"  # step, data position, ...: rank-independent training state
_EXTRA_SCALARS = "extra_scalars"  # a subclass's scalars inside the JSON training state
RNG_DIR = "rng"
_TMP_PREFIX = ".tmp-"


# ------------------------------------------------------------------------- canonical row order
def _complement_boxes(offsets: list[int], sizes: list[int], shape: list[int]) -> list[tuple[list[int], list[int]]]:
    """Boxes (offsets, sizes) that tile ``shape`` minus one box, exactly."""
    boxes = []
    for dim in range(len(shape)):
        prefix_offsets, prefix_sizes = list(offsets[:dim]), list(sizes[:dim])
        rest = list(shape[dim + 1 :])
        for start, stop in ((0, offsets[dim]), (offsets[dim] + sizes[dim], shape[dim])):
            if stop > start:
                boxes.append((prefix_offsets + [start] + [0] * len(rest), prefix_sizes + [stop - start] + rest))
    return boxes


def _complement_rows(runs: list[tuple[int, int]], shape: list[int]) -> list[tuple[list[int], list[int]]]:
    """Row ranges (as boxes) of ``shape`` not covered by the row ``runs`` (start, length)."""
    boxes, position = [], 0
    for start, length in [*sorted(runs), (shape[0], 0)]:
        if start > position:
            boxes.append(([position] + [0] * (len(shape) - 1), [start - position, *shape[1:]]))
        position = start + length
    return boxes


def _device_name(tensor: Tensor) -> str:
    return f"{tensor.device.type}:{tensor.device.index}" if tensor.device.index is not None else tensor.device.type


def _sharded_tensor(pieces: list[tuple[Tensor, list[int]]], shape: torch.Size) -> ShardedTensor:
    """A ShardedTensor of global ``shape`` whose local shards are ``pieces`` (tensor, global offsets).

    ShardedTensor wants metadata that tiles the whole tensor; DCP only uses the local shards (each
    rank plans its own reads and writes, and the global save plan is checked from those). The parts
    this rank does not hold are described as placeholder boxes "owned" by another rank, which is
    never asked for them. Pieces are either one box or several whole-row runs.
    """
    rank = dist.get_rank()
    device = _device_name(pieces[0][0])
    shape = list(shape)
    shards, metadata = [], []
    for piece, offsets in pieces:
        shard_md = ShardMetadata(shard_offsets=list(offsets), shard_sizes=list(piece.shape), placement=f"rank:{rank}/{device}")
        shards.append(LocalShard(piece, shard_md))
        metadata.append(shard_md)
    if len(pieces) == 1:
        holes = _complement_boxes(list(pieces[0][1]), list(pieces[0][0].shape), shape)
    else:
        holes = _complement_rows([(offsets[0], piece.shape[0]) for piece, offsets in pieces], shape)
    other = f"rank:{(rank + 1) % dist.get_world_size()}/{device}"
    metadata += [ShardMetadata(shard_offsets=offsets, shard_sizes=sizes, placement=other) for offsets, sizes in holes]
    global_metadata = ShardedTensorMetadata(
        shards_metadata=metadata,
        size=torch.Size(shape),
        tensor_properties=TensorProperties(dtype=pieces[0][0].dtype, layout=torch.strided, requires_grad=False),
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, global_metadata)


def _checkpoint_tensor(tensor: Tensor, layout: FusedRows | None) -> Tensor | None:
    """A DTensor as a ShardedTensor whose shards view its local data, in single-device coordinates.

    Fused projections (``layout``) are mapped from head-aligned rows to [q|k|v] rows. DCP reads
    into the shards in place. None when this rank holds none of it (uneven FSDP shards).
    """
    if not isinstance(tensor, DTensor):
        return tensor
    local = tensor.to_local()
    sizes, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if local.numel() == 0:
        return None
    if tuple(sizes) == tuple(tensor.shape) and layout is None:
        return local  # one rank holds all of it (a mesh of one): a plain tensor
    if layout is None:
        return _sharded_tensor([(local, list(offsets))], tensor.shape)
    if any(offsets[1:]) or tuple(sizes[1:]) != tuple(tensor.shape[1:]):
        raise MugenError(
            f"checkpoint: a fused projection is sharded along a dimension other than its rows "
            f"(placements {tensor.placements}); shard it on dim 0"
        )
    pieces = [
        (local[local_start : local_start + length], [canonical_start] + [0] * (tensor.dim() - 1))
        for local_start, canonical_start, length in layout.canonical_runs(offsets[0], sizes[0], tensor.shape[0])
    ]
    return _sharded_tensor(pieces, tensor.shape)


def _canonical_view(state: dict, fused_rows: dict[str, FusedRows]) -> dict:
    """A copy of {"model": ..., "optimizer": ...} in single-device coordinates, sharing storage with ``state``."""
    model_state = {name: _checkpoint_tensor(value, fused_rows.get(name)) for name, value in state["model"].items()}
    optimizer_state = dict(state["optimizer"])
    per_parameter = {}
    for name, moments in optimizer_state.get("state", {}).items():
        per_parameter[name] = {
            key: _checkpoint_tensor(value, fused_rows.get(name)) if isinstance(value, Tensor) else value
            for key, value in moments.items()
        }
    if per_parameter:
        optimizer_state["state"] = per_parameter
    view = {**state, "model": model_state, "optimizer": optimizer_state}
    return _drop_empty(view)


class _CopyToCPU(AsyncStager):
    """Stage a checkpoint view for ``dcp.async_save``: CPU copies of plain tensors and of ShardedTensor shards."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return self._copy(state_dict)

    def _copy(self, value):
        if isinstance(value, ShardedTensor):
            pieces = [(shard.tensor.detach().to("cpu", copy=True), shard.metadata.shard_offsets) for shard in value.local_shards()]
            return _sharded_tensor(pieces, value.size())
        if isinstance(value, Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {key: self._copy(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._copy(item) for item in value]
        return copy.deepcopy(value)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _drop_empty(tree):
    if isinstance(tree, dict):
        return {key: _drop_empty(value) for key, value in tree.items() if value is not None}
    return tree


def _training_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    options = StateDictOptions(full_state_dict=False)
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=options), "optimizer": {}}
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optimizer_state}


# ------------------------------------------------------------------------------------ saving
def _training_state_json(step: int, training_state: dict | None) -> str:
    """One JSON string (saved as one object, whatever the nesting): the same on every rank."""
    try:
        return json.dumps({"step": step, **(training_state or {})}, sort_keys=True)
    except TypeError as error:
        raise MugenError(
            f"checkpoint: training_state must hold plain values (numbers, strings, lists, dicts) ({error}); "
            "convert tensors with .tolist()"
        ) from error


class PendingSave:
    """A checkpoint being written; ``wait()`` completes it (rename + ``latest``) on every rank."""

    def __init__(self, final_dir: Path, temp_dir: Path, future, meta: dict, keep: int):
        self.final_dir, self.temp_dir, self.future, self.meta, self.keep = final_dir, temp_dir, future, meta, keep
        self.rng_state = capture_rng_state()  # as of the save call, not of its completion
        self.done = False

    def wait(self) -> Path:
        if self.done:
            return self.final_dir
        if self.future is not None:
            self.future.result()
        _finish(self.final_dir, self.temp_dir, self.meta, self.rng_state, self.keep)
        self.done = True
        return self.final_dir


def _finish(final_dir: Path, temp_dir: Path, meta: dict, rng_state: dict, keep: int) -> None:
    """All ranks have written: rank 0 renames the directory, points ``latest`` at it, prunes old ones."""
    torch.save(rng_state, temp_dir / RNG_DIR / f"rank_{dist.get_rank():05d}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        (temp_dir / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if final_dir.exists():  # the same step again: swap the old one out
            stale = final_dir.with_name(f"{_TMP_PREFIX}old-{final_dir.name}")
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final_dir, stale)
            os.rename(temp_dir, final_dir)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(temp_dir, final_dir)
        write_text_atomically(final_dir.parent / LATEST_FILE, final_dir.name + "\n", durable=True)
        if keep > 0:
            steps = sorted(path for path in final_dir.parent.glob("step_*") if (path / DCP_METADATA_FILE).is_file())
            for old in steps[:-keep]:
                if old != final_dir:
                    shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


class DistributedCheckpointer:
    """Save and load sharded checkpoints of a parallelized model + optimizer + training state.

    ``async_save``: write in a background thread (``dcp.async_save``) when this torch has it;
    otherwise (or with False) ``save`` blocks. Only one save is in flight: a new save first
    completes the previous one. ``keep_checkpoints`` > 0 keeps that many newest step directories.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        async_save: bool = False,
        layout: dict | None = None,
        keep_checkpoints: int = 0,
    ):
        if not dist.is_initialized():
            raise MugenError("DistributedCheckpointer needs torch.distributed initialised (torchrun + build_mesh)")
        self.root = checkpoints_dir(output_dir)
        self.model, self.optimizer = model, optimizer
        self.layout = layout or {}
        self.keep_checkpoints = keep_checkpoints
        # Staging goes through our own stager (DCP's default one cannot copy ShardedTensors).
        can_async = hasattr(dcp, "async_save") and "async_stager" in inspect.signature(dcp.async_save).parameters
        self.async_save = async_save and can_async
        if async_save and not self.async_save:
            logger.warning("this torch's dcp.async_save takes no stager; checkpoints are written synchronously")
        # Background saves talk on their own group, so they never interleave with training collectives.
        self._save_group = dist.new_group(backend="gloo") if self.async_save else None
        self.pending: PendingSave | None = None

    # Hooks for subclasses that checkpoint more than the model and optimizer (e.g. a sharded EMA).
    def extra_tensors_view(self) -> dict:
        """Extra DCP entries saved beside the model and optimizer and loaded back in place."""
        return {}

    def extra_scalars(self) -> dict | None:
        """JSON-able values saved with the training state (and in the step's metadata); None = nothing."""
        return None

    def restore_extra_scalars(self, scalars: dict) -> None:
        """Take back what ``extra_scalars`` saved (called after the tensors are loaded)."""

    def _view(self) -> tuple[dict, dict]:
        fused_rows = getattr(self.model, FUSED_ROWS_ATTRIBUTE, {})
        state = _training_state_dicts(self.model, self.optimizer)
        view = _canonical_view(state, fused_rows)
        view.update(self.extra_tensors_view())
        return state, view

    def save(self, step: int, training_state: dict[str, Any] | None = None) -> PendingSave:
        """Checkpoint the model, optimizer, ``training_state`` (step, data position, ...) and RNG after ``step`` steps."""
        if self.pending is not None:
            self.pending.wait()
        final_dir = self.root / step_dir_name(step)
        temp_dir = self.root / f"{_TMP_PREFIX}{final_dir.name}"
        if dist.get_rank() == 0:
            shutil.rmtree(temp_dir, ignore_errors=True)  # left by a killed save
            (temp_dir / RNG_DIR).mkdir(parents=True)
        dist.barrier()
        _, view = self._view()
        scalars = self.extra_scalars()
        extra = {} if scalars is None else {_EXTRA_SCALARS: scalars}
        view[TRAIN_KEY] = _training_state_json(step, {**(training_state or {}), **extra})
        model_config = getattr(getattr(self.model, "config", None), "to_dict", None)
        meta = {
            "step": step,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mugen_version": __version__,
            "world_size": dist.get_world_size(),
            "layout": self.layout,
            "format": "torch.distributed.checkpoint",
            "model_config": model_config() if model_config else None,
            **({"extra": scalars} if scalars is not None else {}),
        }
        if self.async_save:
            future = dcp.async_save(
                view, checkpoint_id=str(temp_dir), process_group=self._save_group, async_stager=_CopyToCPU()
            )
            self.pending = PendingSave(final_dir, temp_dir, future, meta, self.keep_checkpoints)
            return self.pending
        dcp.save(view, checkpoint_id=str(temp_dir))
        pending = PendingSave(final_dir, temp_dir, None, meta, self.keep_checkpoints)
        pending.wait()
        return pending

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def load(self, checkpoint_dir: str | os.PathLike | None = None, restore_rng: bool = True) -> dict | None:
        """Load into the model and optimizer in place; returns the training state, or None if there is no checkpoint.

        ``checkpoint_dir`` defaults to the one ``latest`` names. RNG states are restored only when
        the checkpoint was written by as many ranks as there are now (otherwise they belong to
        other ranks; mugen's training draws its noise from per-step seeds, so nothing depends on them).
        """
        checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else latest_distributed_checkpoint(self.root.parent)
        if checkpoint_dir is None:
            return None
        if not (checkpoint_dir / DCP_METADATA_FILE).is_file():
            raise MugenError(
                f"checkpoint: {checkpoint_dir} is not a complete distributed checkpoint (no {DCP_METADATA_FILE}); "
                "pass a step directory written by DistributedCheckpointer"
            )
        state, view = self._view()
        view[TRAIN_KEY] = ""  # DCP replaces the object with the saved one
        dcp.load(view, checkpoint_id=str(checkpoint_dir))
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        rng_file = checkpoint_dir / RNG_DIR / f"rank_{dist.get_rank():05d}.pt"
        saved_world = json.loads((checkpoint_dir / META_FILE).read_text()).get("world_size")
        if restore_rng and saved_world == dist.get_world_size() and rng_file.is_file():
            restore_rng_state(torch.load(rng_file, weights_only=True))
        training_state = json.loads(view[TRAIN_KEY])
        if _EXTRA_SCALARS in training_state:
            self.restore_extra_scalars(training_state.pop(_EXTRA_SCALARS))
        return training_state


def latest_distributed_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The step directory ``latest`` names under ``output_dir/checkpoints``, or None when there is none."""
    root = checkpoints_dir(output_dir)
    latest = root / LATEST_FILE
    if not latest.is_file():
        return None
    path = root / latest.read_text().strip()
    if not (path / DCP_METADATA_FILE).is_file():
        raise MugenError(f"checkpoint: {latest} names {path.name}, which is not a complete checkpoint; delete {latest}")
    return path


# ----------------------------------------------------------------------- single-device weights
def load_full_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor] | None, source: str = "state dict", broadcast_from_rank0: bool = False
) -> None:
    """Load a single-device state dict (e.g. the official ``dit.pt``) into a parallelized model, strictly.

    Every rank passes the same dict (read it with ``mmap``: ``read_official_state_dict``), or, with
    ``broadcast_from_rank0``, only rank 0 passes it (the others pass None) and its tensors are
    broadcast. Each rank keeps its own shards. Fused projections are put into the head-aligned order
    of tensor parallelism. Works on a model built on the meta device and moved with ``to_empty``.
    """
    from mugen.models.dit.official import check_state_dict_fits

    holds_weights = not broadcast_from_rank0 or dist.get_rank() == 0
    prepared = {}
    if holds_weights:
        if state_dict is None:
            raise MugenError(f"load_full_state_dict: rank {dist.get_rank()} got no state dict; pass {source} on this rank")
        check_state_dict_fits(state_dict, model, source)
        fused_rows = getattr(model, FUSED_ROWS_ATTRIBUTE, {})
        for name, tensor in state_dict.items():
            if name in fused_rows:
                tensor = tensor[fused_rows[name].permuted_from_canonical(tensor.shape[0])]
            prepared[name] = tensor
    options = StateDictOptions(full_state_dict=True, strict=True, broadcast_from_rank0=broadcast_from_rank0)
    set_model_state_dict(model, prepared, options=options)


def initialize_from_single_device(model: nn.Module, build: Callable[[], nn.Module], device: str | torch.device) -> None:
    """Give a parallelized model (built on the meta device) the weights ``build()`` makes on one device.

    Rank 0 builds the single-device model on the CPU (the whole model in host memory, once per job)
    and its weights are broadcast into every rank's shards, so a run starts from the same weights
    whatever its layout.
    """
    model.to_empty(device=device)
    reference = build() if dist.get_rank() == 0 else None
    state_dict = reference.state_dict() if reference is not None else None
    load_full_state_dict(model, state_dict, source="the single-device model", broadcast_from_rank0=True)


# ------------------------------------------------------------------------------------ export
def read_model_state_dict(checkpoint_dir: str | os.PathLike) -> tuple[dict[str, Tensor], dict | None]:
    """The whole model state dict of a DCP checkpoint on this process (single-device names and order)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / DCP_METADATA_FILE).is_file():
        raise MugenError(f"export: {checkpoint_dir} has no {DCP_METADATA_FILE}; pass a step directory of a distributed checkpoint")
    metadata = dcp.FileSystemReader(str(checkpoint_dir)).read_metadata()
    state = {}
    for name, item in metadata.state_dict_metadata.items():
        if name.startswith("model.") and isinstance(item, TensorStorageMetadata):
            state[name[len("model.") :]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not state:
        raise MugenError(f"export: {checkpoint_dir} holds no model tensors")
    dcp.load({"model": state}, checkpoint_id=str(checkpoint_dir), no_dist=True)
    meta_path = checkpoint_dir / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    return state, meta


def export_checkpoint(checkpoint_dir: str | os.PathLike, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a DCP checkpoint's model as the official ``dit.pt`` (``.pt``) or one ``.safetensors`` file."""
    from mugen.models.dit.official import export_official_checkpoint, export_safetensors

    state, _ = read_model_state_dict(checkpoint_dir)
    path = Path(path)
    if path.suffix == ".safetensors":
        return export_safetensors(state, path, dtype=dtype)
    if path.suffix in (".pt", ".pth"):
        return export_official_checkpoint(state, path, dtype=dtype)
    raise MugenError(f"export: {path} must end in .safetensors or .pt (the official dit.pt layout)")
