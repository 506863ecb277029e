"""Cost-balanced batches for data-parallel ranks and pipeline micro-batches (seed §5.2).

Seed §5.2: "to minimize pipeline stalls arising from variable video sequence lengths, we also
introduce dynamic balanced sampling across all ranks ... each GPU receives batches of comparable
computational cost". Here that is done in three steps:

1. **Cost of a sample.** ``cost = a + b*N + c*N^2`` with N the tokens it puts through the model;
   the quadratic term is self-attention. ``SampleCost.for_dit`` derives (a, b, c) from the FLOP count
   of a MUG-DiT width (``mugen.train.flops``), so 2x the tokens costs more than 2x; any coefficients
   can be given instead.
2. **Micro-batches of one shape and near-equal cost.** Samples are grouped by shape key (a batch
   tensor holds one shape). Each bucket's batch size is ``floor(budget / cost(N))``: a micro-batch
   of 720p video holds one sample where one of images holds dozens. The default budget is
   ``batch_size`` samples of the most expensive shape. Optional caps (``max_batch_size``,
   ``max_tokens``) bound the memory of cheap buckets.
3. **Balanced assignment.** The epoch's micro-batches ("units") form one stream. Each global step
   takes the next ``world_size * micro_batches`` units and assigns them to ranks with the greedy
   longest-processing-time rule under the constraint that every rank gets exactly ``micro_batches``
   units: the most expensive unit goes to the least loaded rank that still has room. Each
   ``StepPlan`` reports the resulting imbalance (max / mean - 1) over ranks and over micro-batches.

Determinism and resumption: the units of epoch e are a pure function of ``(seed, e)`` (numbers of
units per epoch are the same every epoch), and a global step is a pure function of the stream
position. The sampler's state is one integer, the *global* number of units consumed, not a
per-rank counter, so a run saved on 4 ranks resumes on 2 (or with another number of micro-batches)
at exactly the next unit: no sample is lost or repeated. Steps may straddle an epoch boundary;
nothing is dropped or padded.

With tensor/context/pipeline parallelism, ``world_size`` and ``rank`` are the *data-parallel* size
and rank (ranks of one model replica draw the same batches).

`mugen train dit` on several processes plans the *global* step instead (``world_size=1``: every
rank reads the same micro-batches as the single-process run) and splits the rows of each
micro-batch over the data-parallel ranks with ``split_rows``: equal counts, and the rows left
over go to the ranks with the least cost so far in the step, so each rank's step cost is within
one sample's cost of every other's and the gradients stay those of the single-process run
(``mugen.train.distributed_run.BalancedDataParallelShare``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mugen.data.sampling import group_by_shape
from mugen.errors import MugenError


@dataclass(frozen=True)
class SampleCost:
    """Relative cost of one sample of N tokens: ``constant + linear * N + quadratic * N^2``."""

    constant: float = 0.0
    linear: float = 1.0
    quadratic: float = 0.0

    def __post_init__(self):
        if min(self.constant, self.linear, self.quadratic) < 0 or self.linear + self.quadratic <= 0:
            raise MugenError(
                f"SampleCost{(self.constant, self.linear, self.quadratic)}: coefficients must be >= 0 and the "
                "linear or quadratic one positive (cost must grow with the number of tokens)"
            )

    def __call__(self, tokens: float) -> float:
        return self.constant + self.linear * tokens + self.quadratic * tokens * tokens

    @classmethod
    def for_dit(cls, config, text_tokens: int = 300) -> "SampleCost":
        """Training FLOPs of one sample of MUG-DiT (``MUGDiTConfig``) as a quadratic in N, exactly.

        The FLOP count is a quadratic polynomial in the block sequence length N, so three values
        determine it; the coefficients are scaled to FLOPs / 1e9 to keep numbers readable.
        """
        from mugen.train.flops import dit_forward_flops

        n0 = 3
        f0, f1, f2 = (dit_forward_flops(config, n0 + i, text_tokens).training / 1e9 for i in range(3))
        quadratic = (f2 - 2.0 * f1 + f0) / 2.0
        linear = f1 - f0 - quadratic * (2 * n0 + 1)
        constant = f0 - linear * n0 - quadratic * n0 * n0
        return cls(max(constant, 0.0), max(linear, 0.0), max(quadratic, 0.0))


def dit_tokens_for_shape_key(key: tuple, patch_size: Sequence[int] = (1, 2, 2)) -> int:
    """Block tokens of a ``LatentTextDataset`` shape key ``(kind, t, h, w)``: patches + start/end tokens."""
    frames, height, width = key[-3:]
    return math.prod(-(-int(size) // int(patch)) for size, patch in zip((frames, height, width), patch_size)) + 2


@dataclass
class StepPlan:
    """One global step: ``rank_batches[r][j]`` are the dataset indices of rank r's micro-batch j."""

    position: int  # stream position (units consumed before this step)
    rank_batches: list[list[list[int]]]
    rank_costs: list[float]
    micro_batch_costs: list[list[float]]

    @property
    def rank_imbalance(self) -> float:
        """max / mean - 1 of the per-rank costs (0 = perfectly balanced)."""
        return imbalance(self.rank_costs)

    @property
    def micro_batch_imbalance(self) -> float:
        """max / mean - 1 over all micro-batches of the step."""
        return imbalance([cost for costs in self.micro_batch_costs for cost in costs])


def imbalance(costs: Sequence[float]) -> float:
    costs = [float(cost) for cost in costs]
    mean = sum(costs) / len(costs)
    return max(costs) / mean - 1.0 if mean > 0 else 0.0


def assign_longest_first(unit_costs: Sequence[float], ranks: int, per_rank: int) -> list[list[int]]:
    """Greedy LPT with equal counts: unit indices per rank, each rank getting ``per_rank`` units.

    Units in order of decreasing cost (ties: stream order) go to the least loaded rank that has
    room (ties: lowest rank). Deterministic.
    """
    if len(unit_costs) != ranks * per_rank:
        raise ValueError(f"{len(unit_costs)} units cannot fill {ranks} ranks x {per_rank} micro-batches")
    order = sorted(range(len(unit_costs)), key=lambda index: (-unit_costs[index], index))
    loads = [0.0] * ranks
    assigned: list[list[int]] = [[] for _ in range(ranks)]
    for index in order:
        open_ranks = [rank for rank in range(ranks) if len(assigned[rank]) < per_rank]
        rank = min(open_ranks, key=lambda r: (loads[r], r))
        assigned[rank].append(index)
        loads[rank] += unit_costs[index]
    return assigned


def split_rows(rows: int, row_cost: float, loads: list[float]) -> list[int]:
    """Rows of one micro-batch per rank: ``rows // ranks`` each, the remainder to the least loaded ranks.

    ``loads`` (one per rank, the cost each took so far in this step) is updated in place with
    ``count * row_cost``. Ties go to the lower rank. Fed the micro-batches of a step one after the
    other, it keeps max(loads) - min(loads) <= the largest ``row_cost`` (each remainder row goes to
    a rank at the bottom, and every rank gets the same number of the other rows).
    """
    if rows < 0 or row_cost < 0 or not loads:
        raise MugenError(f"split_rows: rows={rows} and row_cost={row_cost} must be >= 0 and loads non-empty")
    ranks = len(loads)
    counts = [rows // ranks] * ranks
    for rank in sorted(range(ranks), key=lambda r: (loads[r], r))[: rows % ranks]:
        counts[rank] += 1
    for rank, count in enumerate(counts):
        loads[rank] += count * row_cost
    return counts


def row_split_plan(batch_sizes: Sequence[int], row_costs: Sequence[float], ranks: int) -> tuple[list[list[int]], list[float]]:
    """``split_rows`` over the micro-batches of one step: (counts[micro][rank], cost per rank)."""
    loads = [0.0] * ranks
    counts = [split_rows(int(size), float(cost), loads) for size, cost in zip(batch_sizes, row_costs)]
    return counts, loads


class BalancedBatchSampler:
    """Yields this rank's micro-batches (lists of dataset indices, one shape each), step after step, forever.

    Every global step yields ``micro_batches`` lists on each rank. The stream never ends: the
    training loop decides how many steps to run. ``position`` is the global number of units consumed.
    """

    is_stream = True  # the Trainer tracks a global position instead of (epoch, batches_done)

    def __init__(
        self,
        shape_keys: Sequence[Hashable],
        sample_tokens: Sequence[int],
        cost: SampleCost | None = None,
        batch_size: int = 1,
        micro_batches: int = 1,
        world_size: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        cost_budget: float | None = None,
        max_batch_size: int | None = None,
        max_tokens: int | None = None,
    ):
        if len(shape_keys) == 0:
            raise MugenError("BalancedBatchSampler: shape_keys is empty; the dataset has no samples")
        if len(sample_tokens) != len(shape_keys):
            raise MugenError(
                f"BalancedBatchSampler: {len(sample_tokens)} token counts for {len(shape_keys)} samples; give one per sample"
            )
        if batch_size < 1 or micro_batches < 1:
            raise MugenError(
                f"BalancedBatchSampler: batch_size={batch_size} and micro_batches={micro_batches} must be at least 1"
            )
        if max_batch_size is not None and max_batch_size < 1:
            raise MugenError(f"BalancedBatchSampler: max_batch_size={max_batch_size} must be at least 1")
        world_size, rank = _data_parallel_world(world_size, rank)
        self.cost = cost or SampleCost()
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.micro_batches = int(micro_batches)
        self.world_size = world_size
        self.rank = rank
        self.num_samples = len(shape_keys)

        self._bucket_keys, self._bucket_indices = group_by_shape(shape_keys)
        self._sample_costs = np.asarray([self.cost(int(tokens)) for tokens in sample_tokens], dtype=np.float64)
        bucket_tokens = [max(int(sample_tokens[i]) for i in members) for members in self._bucket_indices]
        bucket_costs = [float(self._sample_costs[members].max()) for members in self._bucket_indices]

        self.cost_budget = float(cost_budget) if cost_budget is not None else batch_size * max(bucket_costs)
        if self.cost_budget <= 0:
            raise MugenError(f"BalancedBatchSampler: cost_budget={cost_budget} must be positive")
        sizes = []
        for tokens, unit_cost in zip(bucket_tokens, bucket_costs):
            size = max(1, int(self.cost_budget / unit_cost + 1e-9))
            if max_batch_size is not None:
                size = min(size, int(max_batch_size))
            if max_tokens is not None:
                size = max(1, min(size, int(max_tokens) // max(tokens, 1)))
            sizes.append(size)
        self.bucket_batch_sizes = sizes
        self.units_per_epoch = sum(-(-len(members) // size) for members, size in zip(self._bucket_indices, sizes))
        self.position = 0
        self._epoch_cache: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}
        self._cache_lock = threading.Lock()  # a prefetch thread and the training loop both plan steps

    # ------------------------------------------------------------------------------ the stream
    @property
    def bucket_keys(self) -> list[Hashable]:
        return list(self._bucket_keys)

    @property
    def units_per_step(self) -> int:
        return self.world_size * self.micro_batches

    @property
    def epoch(self) -> int:
        return self.position // self.units_per_epoch

    def __len__(self) -> int:
        """Units (micro-batches over all ranks) per epoch."""
        return self.units_per_epoch

    def sample_cost(self, index: int) -> float:
        """Cost of dataset sample ``index`` under this sampler's cost model."""
        return float(self._sample_costs[int(index)])

    def bucket_batch_size(self, key: Hashable) -> int:
        return self.bucket_batch_sizes[self._bucket_keys.index(key)]

    def epoch_units(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(units, costs) of ``epoch`` in stream order; a pure function of (seed, epoch)."""
        with self._cache_lock:
            cached = self._epoch_cache.get(epoch)
        if cached is not None:
            return cached
        rng = np.random.default_rng([self.seed, int(epoch)])
        units: list[np.ndarray] = []
        for members, size in zip(self._bucket_indices, self.bucket_batch_sizes):
            order = rng.permutation(members) if self.shuffle else members
            units.extend(order[start : start + size] for start in range(0, len(order), size))
        if self.shuffle:
            units = [units[i] for i in rng.permutation(len(units))]
        costs = np.asarray([float(self._sample_costs[unit].sum()) for unit in units])
        with self._cache_lock:
            if len(self._epoch_cache) >= 3:  # the loop and the loader are at most a step apart
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[epoch] = (units, costs)
        return units, costs

    def units_at(self, start: int, count: int) -> tuple[list[list[int]], list[float]]:
        """``count`` consecutive units of the endless stream from position ``start``."""
        units, costs = [], []
        position = start
        while len(units) < count:
            epoch, offset = divmod(position, self.units_per_epoch)
            epoch_units, epoch_costs = self.epoch_units(epoch)
            take = min(count - len(units), self.units_per_epoch - offset)
            units.extend(unit.tolist() for unit in epoch_units[offset : offset + take])
            costs.extend(float(cost) for cost in epoch_costs[offset : offset + take])
            position += take
        return units, costs

    def step_plan(self, position: int | None = None) -> StepPlan:
        """The global step that starts at stream ``position`` (default: the sampler's position)."""
        position = self.position if position is None else int(position)
        units, costs = self.units_at(position, self.units_per_step)
        assignment = assign_longest_first(costs, self.world_size, self.micro_batches)
        return StepPlan(
            position=position,
            rank_batches=[[units[i] for i in unit_ids] for unit_ids in assignment],
            rank_costs=[sum(costs[i] for i in unit_ids) for unit_ids in assignment],
            micro_batch_costs=[[costs[i] for i in unit_ids] for unit_ids in assignment],
        )

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's micro-batches from the current position on; ``position`` advances per step."""
        while True:
            plan = self.step_plan(self.position)
            self.position += self.units_per_step
            yield from plan.rank_batches[self.rank]

    # ------------------------------------------------------------------------------ resumption
    def seek_position(self, position: int) -> None:
        if int(position) < 0:
            raise MugenError(f"BalancedBatchSampler.seek_position: position={position} must be >= 0")
        self.position = int(position)

    def state_dict(self, position: int | None = None) -> dict:
        """Global position (units consumed by all ranks) and the settings that define the units.

        ``position`` overrides the sampler's own (a prefetching loader reads ahead of training).
        """
        position = self.position if position is None else int(position)
        return {
            "kind": "balanced",
            "position": position,
            "epoch": position // self.units_per_epoch,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "units_per_epoch": self.units_per_epoch,
            "bucket_batch_sizes": list(self.bucket_batch_sizes),
            "shuffle": self.shuffle,
            "world_size": self.world_size,  # informative: a different world size may resume
            "micro_batches": self.micro_batches,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved global position; the world size and micro-batch count may differ."""
        if state.get("kind") != "balanced":
            raise MugenError(
                "BalancedBatchSampler.load_state_dict: the checkpoint was written with the plain shape-bucket sampler; "
                "resume with the same sampler (drop --balanced) or start a new run"
            )
        current = self.state_dict()
        for name in ("seed", "num_samples", "units_per_epoch", "bucket_batch_sizes", "shuffle"):
            if list(np.atleast_1d(state[name])) != list(np.atleast_1d(current[name])):
                raise MugenError(
                    f"BalancedBatchSampler.load_state_dict: saved {name}={state[name]!r} but this sampler has "
                    f"{current[name]!r}; resume with the same dataset, seed, batch size and cost model, or start a new run"
                )
        self.seek_position(state["position"])


def _data_parallel_world(world_size: int | None, rank: int | None) -> tuple[int, int]:
    if world_size is None or rank is None:
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
        rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise MugenError(f"BalancedBatchSampler: rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    return int(world_size), int(rank)
