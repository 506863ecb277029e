"""Parallel training of MUG-DiT on torch.distributed, applied from outside the model (seed §5).

``build_mesh`` + ``parallelize_dit`` lay a single-device model over data-replicate x data-shard
(FSDP2/HSDP) x context x tensor(+sequence) x pipeline ranks; ``DistributedCheckpointer`` saves and
resumes sharded training state on any layout. Model files never import this package.
"""

from mugen.distributed.checkpoint import (
    DistributedCheckpointer,
    export_checkpoint,
    initialize_from_single_device,
    load_full_state_dict,
)
from mugen.distributed.mesh import MESH_AXES, ParallelConfig, build_mesh
from mugen.distributed.parallelize import clip_grad_norm_, data_parallel_rank, parallelize_dit

__all__ = [
    "MESH_AXES",
    "DistributedCheckpointer",
    "ParallelConfig",
    "build_mesh",
    "clip_grad_norm_",
    "data_parallel_rank",
    "export_checkpoint",
    "initialize_from_single_device",
    "load_full_state_dict",
    "parallelize_dit",
]
