"""The device mesh and the parallel layout of a run (seed §5.1: 5D parallelism).

Axes, outermost first: ``dp_replicate`` (HSDP replicas), ``dp_shard`` (FSDP2 shards), ``cp``
(context parallel), ``tp`` (tensor + sequence parallel), ``pp`` (pipeline stages). Every axis is
always present (size 1 when unused), so code asks ``mesh["tp"]`` by name without checking. With
``pp`` = 1, ranks that differ only in ``tp`` are adjacent, which keeps the most
communication-heavy group inside one node on a GPU cluster.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mugen.errors import MugenError

MESH_AXES = ("dp_replicate", "dp_shard", "cp", "tp", "pp")
ACTIVATION_CHECKPOINTING_MODES = ("none", "selective", "full")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class ParallelConfig:
    """How ``parallelize_dit`` lays one model over the ranks (sizes multiply to the world size)."""

    dp_replicate: int = 1  # > 1 with dp_shard > 1: HSDP (shard inside a group, replicate across groups)
    dp_shard: int = 1  # FSDP2 shard group size
    cp: int = 1  # context parallel (ring attention), distributed/context_parallel.py
    tp: int = 1  # tensor parallel with sequence parallel between blocks
    pp: int = 1  # pipeline stages, distributed/pipeline.py
    activation_checkpointing: str = "none"  # "none", "selective" (keep matmul outputs) or "full" (per block)
    compile_blocks: bool = False  # torch.compile each block's forward
    # compiled blocks: torch's activation_memory_budget for the compiler's fwd/bwd partitioner (1.0 = keep what the
    # default partitioner keeps; lower lets it recompute cheap ops in the backward to keep fewer activations)
    compile_memory_budget: float = 1.0
    param_dtype: str = "bf16"  # FSDP2 compute dtype of the gathered weights ("bf16" or "fp32")
    reduce_dtype: str = "fp32"  # FSDP2 gradient reduction dtype
    reshard_after_forward: bool = True  # free gathered weights after each block's forward (ZeRO-3)
    pp_microbatches: int = 1  # micro-batches per step through the pipeline (pp > 1)
    pp_schedule: str = "1F1B"  # pipeline schedule, see distributed/pipeline.py

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, axis) for axis in MESH_AXES)

    @property
    def world_size(self) -> int:
        size = 1
        for axis_size in self.sizes:
            size *= axis_size
        return size

    @property
    def data_parallel_size(self) -> int:
        """Ranks that see different samples (every other axis splits one sample's work)."""
        return self.dp_replicate * self.dp_shard

    def validate(self, world_size: int | None = None) -> None:
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or size < 1:
                raise MugenError(f"ParallelConfig: {axis}={size!r} must be a whole number >= 1")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING_MODES:
            raise MugenError(
                f"ParallelConfig: activation_checkpointing={self.activation_checkpointing!r}; "
                f"choose one of {', '.join(ACTIVATION_CHECKPOINTING_MODES)}"
            )
        budget = self.compile_memory_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
            raise MugenError(
                f"ParallelConfig: compile_memory_budget={budget!r} must be a number in (0, 1]; 1 keeps the default "
                "partitioner, e.g. 0.8 recomputes cheap ops of compiled blocks to keep fewer activations"
            )
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in PRECISION_DTYPES:
                raise MugenError(
                    f"ParallelConfig: {name}={getattr(self, name)!r}; choose one of {', '.join(PRECISION_DTYPES)}"
                )
        if world_size is not None and self.world_size != world_size:
            layout = " x ".join(f"{axis}={getattr(self, axis)}" for axis in MESH_AXES)
            raise MugenError(
                f"ParallelConfig: {layout} = {self.world_size} ranks, but the job has {world_size}; "
                "make the axis sizes multiply to the number of processes (torchrun --nproc-per-node x nodes)"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def build_mesh(config: ParallelConfig, device_type: str | None = None) -> DeviceMesh:
    """A 5D ``DeviceMesh`` over all ranks with axes ``MESH_AXES`` (initialises the process group if needed).

    ``device_type`` defaults to "cuda" when CUDA is available (NCCL, device ``LOCAL_RANK``), else "cpu" (gloo).
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per process, as torchrun starts them
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    config.validate(dist.get_world_size())
    return init_device_mesh(device_type, config.sizes, mesh_dim_names=MESH_AXES)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
    """The mesh FSDP2 works over: (dp_replicate, dp_shard[*cp]) for HSDP, else dp_shard[*cp]; None if size 1.

    Context-parallel ranks hold the same weights and see different tokens of one sample, so FSDP
    shards over them as well (torchtitan's ``dp_shard_cp``); their gradients are summed with the
    data-parallel ones.
    """
    sizes = dict(zip(mesh.mesh_dim_names, mesh.shape))
    shard_axes = ("dp_shard", "cp") if sizes["cp"] > 1 else ("dp_shard",)
    if sizes["cp"] > 1:
        shard_mesh_name = "dp_shard_cp"
        mesh[shard_axes]._flatten(shard_mesh_name)
    else:
        shard_mesh_name = "dp_shard"
    if sizes["dp_replicate"] > 1:
        return mesh["dp_replicate", shard_mesh_name]
    if sizes["dp_shard"] * sizes["cp"] > 1:
        return mesh[shard_mesh_name]
    return None


def axis_size(mesh: DeviceMesh, axis: str) -> int:
    return dict(zip(mesh.mesh_dim_names, mesh.shape))[axis]
