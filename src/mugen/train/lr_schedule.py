"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

Linear warm-up from 0, then a decay to ``min_lr_ratio`` of the peak at ``total_steps`` (seed §4.2.3:
the annealed SFT stage continues "with a gradually decaying learning rate").

Step ``s`` is the index of the optimizer step (0 for the first). During warm-up the multiplier is
``(s + 1) / warmup_steps``: the ramp starts from 0 one step before the first update, so no update
is spent at learning rate 0, and the last warm-up step reaches the peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from mugen.errors import MugenError

DECAYS = ("cosine", "linear", "constant")


def build_lr_lambda(
    warmup_steps: int, total_steps: int, decay: str = "cosine", min_lr_ratio: float = 0.1
) -> Callable[[int], float]:
    """Return ``f(step) -> multiplier of the peak learning rate``."""
    if decay not in DECAYS:
        raise MugenError(f"lr schedule: decay={decay!r} is not one of {DECAYS}")
    if total_steps < 1:
        raise MugenError(f"lr schedule: total_steps={total_steps} must be at least 1")
    if not 0 <= warmup_steps <= total_steps:
        raise MugenError(f"lr schedule: warmup_steps={warmup_steps} must be between 0 and total_steps={total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise MugenError(f"lr schedule: min_lr_ratio={min_lr_ratio} must be between 0 and 1")
    decay_steps = max(1, total_steps - warmup_steps)

    # A closure, not a callable object: LambdaLR.state_dict() skips plain functions, so a resumed
    # run uses the schedule of its own config instead of one pickled into the checkpoint.
    def lr_multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps)  # 0 at the peak, 1 at total_steps
        if decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return lr_multiplier
