"""Preference data for Flow-DPO / Flow-KTO: the manifest format, its dataset and a source-mixing sampler.

Seed §4.2.3: preference annotations come from several sources (motion-quality pairs, error-free
pass/fail labels, ...) and batches from them are interleaved in a configured ratio.

Preference manifest (Parquet, one row per entry; paths relative to the manifest's folder):

==================  =======  ===================================================================
column              kinds    meaning
==================  =======  ===================================================================
``kind``            both     ``"dpo"`` (a better/worse pair) or ``"kto"`` (one clip with a label)
``sample_id``       both     unique id of the row
``source``          both     annotation source name (batches never mix sources)
``text_feat_path``  both     text features of the prompt (``mugen.models.text.base`` format)
``fps``             both     frame rate of the clips (0 = unknown, the model's default is used)
``latent_w_path``   dpo      latents (C, T, h, w) of the preferred clip
``latent_l_path``   dpo      latents of the rejected clip (same shape)
``latent_path``     kto      latents of the clip
``label``           kto      1 = desirable (passes), 0 = undesirable (fails)
==================  =======  ===================================================================

Latent files are mugen latent files (``{"latents": (C, T, h, w)}`` safetensors, see
``mugen.data.datasets.save_latent``), normalised like the SFT data. A manifest holds one kind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mugen.errors import MugenError

DPO_COLUMNS = ("kind", "sample_id", "source", "text_feat_path", "fps", "latent_w_path", "latent_l_path")
KTO_COLUMNS = ("kind", "sample_id", "source", "text_feat_path", "fps", "latent_path", "label")


def write_preference_dataset(output_dir: str | os.PathLike, entries: list[dict]) -> Path:
    """Write in-memory preference entries as latent/text files plus ``preference.parquet``; returns its path.

    DPO entries: ``{"latents_w", "latents_l", "text_states", "text_mask", "fps", "source"}``;
    KTO entries: ``{"latents", "label", "text_states", "text_mask", "fps", "source"}``
    (latents (C, T, h, w); text (L, D) and (L,)). Files are written atomically, the manifest last.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mugen.atomic import write_atomically
    from mugen.data.datasets import save_latent
    from mugen.models.text.base import save_text_features

    if not entries:
        raise MugenError(f"preference data for {output_dir}: no entries to write")
    output_dir = Path(output_dir)
    (output_dir / "latents").mkdir(parents=True, exist_ok=True)
    (output_dir / "text").mkdir(parents=True, exist_ok=True)
    kind = "dpo" if "latents_w" in entries[0] else "kto"
    rows = []
    for index, entry in enumerate(entries):
        sample_id = str(entry.get("sample_id", f"{kind}-{index:06d}"))
        row = {"kind": kind, "sample_id": sample_id, "source": str(entry.get("source", "default")), "fps": float(entry.get("fps", 0.0))}
        text_path = Path("text") / f"{sample_id}.safetensors"
        save_text_features(output_dir / text_path, entry["text_states"], entry["text_mask"])
        row["text_feat_path"] = str(text_path)
        if kind == "dpo":
            for key, column in (("latents_w", "latent_w_path"), ("latents_l", "latent_l_path")):
                path = Path("latents") / f"{sample_id}-{key[-1]}.safetensors"
                save_latent(output_dir / path, entry[key])
                row[column] = str(path)
        else:
            path = Path("latents") / f"{sample_id}.safetensors"
            save_latent(output_dir / path, entry["latents"])
            row["latent_path"] = str(path)
            row["label"] = int(entry["label"])
        rows.append(row)
    manifest = output_dir / "preference.parquet"
    table = pa.Table.from_pylist(rows)
    write_atomically(manifest, lambda temporary: pq.write_table(table, str(temporary)))
    return manifest


class PreferenceDataset(Dataset):
    """DPO pairs or KTO samples, from a preference manifest or from in-memory entries."""

    def __init__(self, entries: list[dict], kind: str):
        if kind not in ("dpo", "kto"):
            raise MugenError(f"PreferenceDataset: kind={kind!r}; use 'dpo' or 'kto'")
        if not entries:
            raise MugenError("PreferenceDataset got no entries; give a manifest with at least one row")
        needed = ("latents_w", "latents_l") if kind == "dpo" else ("latents", "label")
        for index, entry in enumerate(entries):
            missing = [key for key in (*needed, "text_states", "text_mask") if key not in entry]
            if missing:
                raise MugenError(f"PreferenceDataset ({kind}): entry {index} lacks {missing}")
            if kind == "dpo" and entry["latents_w"].shape != entry["latents_l"].shape:
                raise MugenError(
                    f"PreferenceDataset: pair {index} has winner {tuple(entry['latents_w'].shape)} and loser "
                    f"{tuple(entry['latents_l'].shape)}; the two clips of a pair must share one latent shape"
                )
        self.entries = entries
        self.kind = kind

    @classmethod
    def from_manifest(cls, path: str | os.PathLike) -> "PreferenceDataset":
        import pyarrow.parquet as pq

        from mugen.data.datasets import load_latent
        from mugen.models.text.base import load_text_features

        path = Path(path)
        if not path.is_file():
            raise MugenError(f"preference manifest {path} does not exist; see mugen.train.preference_data for its columns")
        rows = pq.read_table(str(path)).to_pylist()
        if not rows:
            raise MugenError(f"preference manifest {path} has no rows")
        kinds = {row.get("kind") for row in rows}
        if len(kinds) != 1 or not kinds <= {"dpo", "kto"}:
            raise MugenError(f"preference manifest {path}: column 'kind' holds {sorted(map(str, kinds))}; one manifest holds only 'dpo' or only 'kto' rows")
        kind = kinds.pop()
        columns = DPO_COLUMNS if kind == "dpo" else KTO_COLUMNS
        missing = [column for column in columns if column not in rows[0]]
        if missing:
            raise MugenError(f"preference manifest {path} lacks columns {missing}; a {kind} manifest needs {list(columns)}")
        folder = path.parent
        entries = []
        for row in rows:
            states, mask = load_text_features(folder / row["text_feat_path"])
            entry = {"text_states": states.float(), "text_mask": mask.bool(), "fps": float(row["fps"]), "source": row["source"], "sample_id": row["sample_id"]}
            if kind == "dpo":
                entry["latents_w"] = load_latent(folder / row["latent_w_path"]).float()
                entry["latents_l"] = load_latent(folder / row["latent_l_path"]).float()
            else:
                label = int(row["label"])
                if label not in (0, 1):
                    raise MugenError(f"preference manifest {path}: row {row['sample_id']} has label {label}; use 1 (desirable) or 0 (undesirable)")
                entry["latents"] = load_latent(folder / row["latent_path"]).float()
                entry["label"] = label
            entries.append(entry)
        return cls(entries, kind)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        return self.entries[index]

    def sources(self) -> list[str]:
        return [str(entry.get("source", "default")) for entry in self.entries]

    def shape_keys(self) -> list[tuple]:
        key = "latents_w" if self.kind == "dpo" else "latents"
        return [tuple(entry[key].shape) for entry in self.entries]

    def collate(self, items: list[dict]) -> dict:
        """Stack one (source, shape) bucket; text right-padded to the batch's longest caption."""
        states, mask = stack_text([(item["text_states"], item["text_mask"]) for item in items])  # (B, L, D), (B, L)
        batch = {
            "text_states": states,
            "text_mask": mask,
            "fps": torch.tensor([float(item.get("fps", 0.0)) for item in items]),  # (B,)
            "sources": [str(item.get("source", "default")) for item in items],
        }
        if self.kind == "dpo":
            batch["latents_w"] = torch.stack([item["latents_w"] for item in items])  # (B, C, T, h, w)
            batch["latents_l"] = torch.stack([item["latents_l"] for item in items])
        else:
            batch["latents"] = torch.stack([item["latents"] for item in items])
            batch["label"] = torch.tensor([int(item["label"]) for item in items])  # (B,)
        return batch


class SourceMixBatchSampler:
    """Batches from several annotation sources in a configured ratio (seed §4.2.3), resumable.

    Every batch holds one source and one shape. Each epoch has ``batches_per_epoch`` batches; batch
    ``j`` picks its source with probabilities ``ratios`` and takes that source's next batch from a
    shuffled, cycled stream of its shape-bucketed batches. Like ``ShapeBucketBatchSampler`` the
    epoch is a pure function of ``(seed, epoch)``, so ``(epoch, batches_done)`` is the whole state.
    """

    def __init__(
        self,
        sources: list[str],
        shape_keys: list[Hashable],
        batch_size: int,
        ratios: dict[str, float],
        seed: int = 0,
        batches_per_epoch: int | None = None,
    ):
        if len(sources) != len(shape_keys) or not sources:
            raise MugenError("SourceMixBatchSampler: give one source and one shape key per sample (and at least one sample)")
        if batch_size < 1:
            raise MugenError(f"SourceMixBatchSampler: batch_size={batch_size} must be at least 1")
        present = sorted(set(sources))
        unknown = sorted(set(ratios) - set(present))
        missing = sorted(set(present) - set(ratios))
        if unknown or missing:
            raise MugenError(
                f"SourceMixBatchSampler: ratios name sources {sorted(ratios)} but the data holds {present}; "
                "give one ratio per source present in the data"
            )
        for name, ratio in ratios.items():
            if not math.isfinite(ratio) or ratio < 0:
                raise MugenError(f"SourceMixBatchSampler: ratio for {name!r} is {ratio!r}; it must be finite and >= 0")
        if sum(ratios.values()) <= 0:
            raise MugenError("SourceMixBatchSampler: all ratios are 0; give at least one source a positive ratio")
        self.source_names = present
        self.weights = np.array([ratios[name] for name in present], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_samples = len(sources)
        # members[source][shape] -> indices
        self._members: dict[str, dict[Hashable, list[int]]] = {name: {} for name in present}
        for index, (source, key) in enumerate(zip(sources, shape_keys)):
            self._members[source].setdefault(key, []).append(index)
        natural = sum(-(-len(m) // self.batch_size) for groups in self._members.values() for m in groups.values())
        self.batches_per_epoch = int(batches_per_epoch or natural)
        self.epoch = 0
        self.batches_done = 0

    def _source_stream(self, source: str, rng: np.random.Generator):
        """Endless shuffled batches of one source (reshuffled each pass)."""
        groups = self._members[source]
        while True:
            batches = []
            for key in groups:
                order = rng.permutation(groups[key])
                batches += [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
            for position in rng.permutation(len(batches)):
                yield batches[position]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, int(epoch)])
        picks = rng.choice(len(self.source_names), size=self.batches_per_epoch, p=self.weights)
        streams = {name: self._source_stream(name, np.random.default_rng([self.seed, int(epoch), i + 1])) for i, name in enumerate(self.source_names)}
        return [next(streams[self.source_names[pick]]) for pick in picks]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done = int(epoch), 0

    def __iter__(self):
        batches = self.epoch_batches(self.epoch)
        while self.batches_done < len(batches):
            batch = batches[self.batches_done]
            self.batches_done += 1
            yield batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self, batches_done: int | None = None) -> dict:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done if batches_done is None else int(batches_done),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batches_per_epoch": self.batches_per_epoch,
            "sources": list(self.source_names),
            "weights": [float(w) for w in self.weights],
        }

    def load_state_dict(self, state: dict) -> None:
        current = self.state_dict()
        for name in ("seed", "num_samples", "batches_per_epoch", "sources"):
            if name in state and state[name] != current[name]:
                raise MugenError(
                    f"SourceMixBatchSampler.load_state_dict: saved {name}={state[name]!r} but this sampler has "
                    f"{current[name]!r}; resume with the same preference data and settings"
                )
        self.seek(state["epoch"], state["batches_done"])

    def seek(self, epoch: int, batches_done: int) -> None:
        if not 0 <= int(batches_done) <= len(self):
            raise MugenError(f"SourceMixBatchSampler.seek: batches_done={batches_done} is outside 0..{len(self)}")
        self.epoch, self.batches_done = int(epoch), int(batches_done)


def stack_text(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Right-pad (L_i, D) states and (L_i,) masks to one length: ((B, L, D), (B, L))."""
    longest = max(states.shape[0] for states, _ in items)
    states_out = torch.zeros(len(items), longest, items[0][0].shape[1])
    mask_out = torch.zeros(len(items), longest, dtype=torch.bool)
    for b, (states, mask) in enumerate(items):
        states_out[b, : states.shape[0]] = states
        mask_out[b, : mask.shape[0]] = mask
    return states_out, mask_out
