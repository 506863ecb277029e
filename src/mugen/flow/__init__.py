"""Rectified flow (seed §4.2, DESIGN.md "Tensor and time conventions"): timesteps, objective, sampler.

The flow code never imports a model: it calls ``velocity_fn(x_t, t, frame_cond_mask) -> v`` with
t in [0, 1]; the caller's closure feeds the network ``1000 * t`` and the text features.
"""

from mugen.flow.objective import (
    IMAGE_SAMPLE_WEIGHT,
    FlowPathSample,
    flow_matching_loss,
    sample_flow_path,
    timestep_bin_losses,
)
from mugen.flow.sampler import FlowSamplerConfig, euler_sample
from mugen.flow.timesteps import (
    resolution_shift_ratio,
    sample_training_timesteps,
    sampling_schedule,
    shift_timesteps,
)

__all__ = [
    "IMAGE_SAMPLE_WEIGHT",
    "FlowPathSample",
    "FlowSamplerConfig",
    "euler_sample",
    "flow_matching_loss",
    "resolution_shift_ratio",
    "sample_flow_path",
    "sample_training_timesteps",
    "sampling_schedule",
    "shift_timesteps",
    "timestep_bin_losses",
]
