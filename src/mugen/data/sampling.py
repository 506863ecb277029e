"""Shape-bucketed, resumable batch sampler.

Videos of different resolutions and frame counts cannot share a batch tensor, so samples are
grouped by a shape key (e.g. ``(frames, height, width)``) and every batch is drawn from one group
(seed §5.2: variable sequence lengths are the source of pipeline stalls; a batch of one shape has
one cost). Each bucket may take its own batch size, so image buckets can carry larger batches
than long-video buckets.

The batches of an epoch are a pure function of ``(seed, epoch)``: the sampler never holds hidden
random state, so its position is fully described by ``(epoch, batches_done)`` and a resumed run
continues at exactly the next batch.

Usage::

    sampler = ShapeBucketBatchSampler(keys, batch_size=8, seed=0)
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        for indices in sampler:      # one epoch per iteration, from the current position
            ...
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

import numpy as np

from mugen.errors import MugenError


def group_by_shape(shape_keys) -> tuple[list[Hashable], list[np.ndarray]]:
    """Bucket keys in order of first appearance (independent of hash order) and each bucket's indices."""
    keys: list[Hashable] = []
    members: dict[Hashable, list[int]] = {}
    for index, key in enumerate(shape_keys):
        if key not in members:
            members[key] = []
            keys.append(key)
        members[key].append(index)
    return keys, [np.asarray(members[key], dtype=np.int64) for key in keys]


class ShapeBucketBatchSampler:
    """Yields lists of dataset indices; every list holds samples of one shape key."""

    def __init__(
        self,
        shape_keys: list[Hashable],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
        batch_size_for_key: dict[Hashable, int] | None = None,
    ):
        if len(shape_keys) == 0:
            raise MugenError("ShapeBucketBatchSampler: shape_keys is empty; the dataset has no samples")
        if batch_size < 1:
            raise MugenError(f"ShapeBucketBatchSampler: batch_size={batch_size} must be at least 1")
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.batch_size = int(batch_size)
        self.num_samples = len(shape_keys)

        self._bucket_keys, self._bucket_indices = group_by_shape(shape_keys)

        batch_size_for_key = dict(batch_size_for_key or {})
        unknown = [key for key in batch_size_for_key if key not in self._bucket_keys]
        if unknown:
            raise MugenError(
                f"ShapeBucketBatchSampler: batch_size_for_key names shape keys {unknown[:3]} that no sample has; "
                f"known keys are {self._bucket_keys[:8]}"
            )
        for key, size in batch_size_for_key.items():
            if int(size) < 1:
                raise MugenError(f"ShapeBucketBatchSampler: batch_size_for_key[{key!r}]={size} must be at least 1")
        self._bucket_batch_sizes = [int(batch_size_for_key.get(key, self.batch_size)) for key in self._bucket_keys]

        self.epoch = 0
        self.batches_done = 0

    # ----------------------------------------------------------------------------------- epochs
    @property
    def bucket_keys(self) -> list[Hashable]:
        return list(self._bucket_keys)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``; its batches depend only on (seed, epoch)."""
        self.epoch = int(epoch)
        self.batches_done = 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` in the order they are yielded."""
        # One generator per (seed, epoch): no state carries over between epochs.
        rng = np.random.default_rng([self.seed, int(epoch)])
        batches: list[list[int]] = []
        for members, size in zip(self._bucket_indices, self._bucket_batch_sizes):
            order = rng.permutation(members) if self.shuffle else members
            for start in range(0, len(order), size):
                batch = order[start : start + size]
                if len(batch) < size and self.drop_last:
                    continue
                batches.append(batch.tolist())
        if self.shuffle:
            # Interleave buckets so consecutive steps see different shapes.
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        """Yield the remaining batches of the current epoch (one epoch per iteration)."""
        batches = self.epoch_batches(self.epoch)
        while self.batches_done < len(batches):
            batch = batches[self.batches_done]
            self.batches_done += 1
            yield batch

    def __len__(self) -> int:
        """Number of batches in one epoch (the same for every epoch)."""
        total = 0
        for members, size in zip(self._bucket_indices, self._bucket_batch_sizes):
            total += len(members) // size if self.drop_last else -(-len(members) // size)
        return total

    # ------------------------------------------------------------------------------ resumption
    def state_dict(self, batches_done: int | None = None) -> dict:
        """Position and settings of the sampler.

        ``batches_done`` overrides the sampler's own counter: a DataLoader with workers draws
        batches ahead of what training has consumed, so a trainer passes the number it consumed.
        """
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done if batches_done is None else int(batches_done),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batches_per_epoch": len(self),
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; the next ``__iter__`` continues at exactly the next batch."""
        if state.get("kind") == "balanced":
            raise MugenError(
                "ShapeBucketBatchSampler.load_state_dict: the checkpoint was written with the cost-balanced sampler; "
                "resume with it (`mugen train dit --balanced`) or start a new run"
            )
        current = self.state_dict()
        for name in ("seed", "num_samples", "batches_per_epoch", "batch_size", "drop_last", "shuffle"):
            if name in state and state[name] != current[name]:
                raise MugenError(
                    f"ShapeBucketBatchSampler.load_state_dict: saved {name}={state[name]!r} but this sampler has "
                    f"{current[name]!r}; resume with the same dataset and sampler settings, or start a new run"
                )
        self.seek(state["epoch"], state["batches_done"])

    def seek(self, epoch: int, batches_done: int) -> None:
        """Move to batch ``batches_done`` of ``epoch``; the next ``__iter__`` starts there."""
        if not 0 <= int(batches_done) <= len(self):
            raise MugenError(f"ShapeBucketBatchSampler.seek: batches_done={batches_done} is outside 0..{len(self)}")
        self.epoch = int(epoch)
        self.batches_done = int(batches_done)
