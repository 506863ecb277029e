"""FSDP2 (``fully_shard``) for MUG-DiT: one unit per block plus the root (seed §5.1, ZeRO-3 style).

Each block's weights are gathered just before it runs and freed after (``reshard_after_forward``),
so a rank holds its 1 / dp_shard share of every weight plus one gathered block at a time. The
mixed-precision policy computes in bf16 and reduces gradients in fp32 (the fp32 master weights and
AdamW moments stay sharded). With ``dp_replicate`` > 1 the mesh is 2D and FSDP2 becomes HSDP:
shards inside a group, replicas across groups (gradients all-reduced across them).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mugen.distributed.mesh import PRECISION_DTYPES


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    param_dtype: str = "bf16",
    reduce_dtype: str = "fp32",
    reshard_after_forward: bool = True,
) -> nn.Module:
    """``fully_shard`` each block of ``model.blocks`` and then ``model`` itself, in place; returns ``model``."""
    policy = MixedPrecisionPolicy(param_dtype=PRECISION_DTYPES[param_dtype], reduce_dtype=PRECISION_DTYPES[reduce_dtype])
    blocks = list(model.blocks)
    for index, block in enumerate(blocks):
        # The last block's weights are needed again at once by backward: keep them gathered.
        fully_shard(
            block,
            mesh=dp_mesh,
            mp_policy=policy,
            reshard_after_forward=reshard_after_forward and index < len(blocks) - 1,
        )
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model
