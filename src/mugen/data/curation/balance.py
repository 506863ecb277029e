"""Sampling weights that lift under-represented tags (seed §2.1 "Data balancing").

The seed stratifies sampling over a tag ontology "so under-represented categories receive
adequate weight". We use inverse frequency with a temperature:

    count(t)  = number of kept clips that carry tag t (tags are namespaced: "subject:dog")
    f_i       = the frequency that represents clip i: the count of its rarest tag ("min", the
                default: one rare subject is enough to lift a clip) or the geometric mean of its
                tags' counts ("geomean"); clips without tags form one group "untagged" whose
                count is the number of untagged kept clips
    w_i       = f_i ** -temperature, normalised so the kept clips' weights sum to their number
                (mean weight 1); dropped clips get weight 0

temperature 0 gives uniform weights, 1 full inverse frequency (every tag group drawn about
equally often when each clip has one tag), values in between interpolate. `max_weight` caps a
single clip's weight relative to the mean (before the final normalisation) so one rare clip is not
drawn thousands of times per epoch.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from mugen.data.curation.tags import TAG_KINDS
from mugen.errors import MugenError

COMBINE_RULES = ("min", "geomean")
UNTAGGED = "untagged"


@dataclass
class BalanceConfig:
    temperature: float = 0.5  # tau in w ∝ freq^-tau; 0 = uniform, 1 = inverse frequency
    combine: str = "min"  # how a clip's tag counts become one frequency: "min" or "geomean"
    max_weight: float | None = 10.0  # cap relative to the mean weight (None = no cap)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise MugenError(f"balance temperature {self.temperature} must be >= 0 (0 = uniform, 1 = inverse frequency)")
        if self.combine not in COMBINE_RULES:
            raise MugenError(f"balance combine {self.combine!r} is unknown; use one of {COMBINE_RULES}")
        if self.max_weight is not None and not self.max_weight >= 1:
            raise MugenError(f"balance max_weight {self.max_weight} must be >= 1 (relative to the mean weight) or null")


def clip_tags(row: dict) -> list[str]:
    """Namespaced tags of a manifest row: ["subject:dog", "action:run", "scene:beach", ...]."""
    tags = []
    for kind in TAG_KINDS:
        prefix = kind[:-1]  # subjects -> subject
        tags += [f"{prefix}:{tag}" for tag in (row.get(f"tag_{kind}") or [])]
    return tags


def tag_counts(rows: list[dict], kept_only: bool = True) -> Counter:
    """count(t): how many (kept) clips carry each namespaced tag."""
    counts: Counter = Counter()
    for row in rows:
        if kept_only and not row.get("keep", True):
            continue
        counts.update(set(clip_tags(row)) or {UNTAGGED})
    return counts


def balance_weights(tag_lists: list[list[str]], config: BalanceConfig) -> list[float]:
    """Weights for clips with the given tags (see the module docstring); they sum to len(tag_lists)."""
    if not tag_lists:
        return []
    counts: Counter = Counter()
    for tags in tag_lists:
        counts.update(set(tags) or {UNTAGGED})
    frequencies = []
    for tags in tag_lists:
        clip_counts = [counts[tag] for tag in (set(tags) or {UNTAGGED})]
        if config.combine == "min":
            frequencies.append(float(min(clip_counts)))
        else:
            frequencies.append(math.exp(sum(math.log(c) for c in clip_counts) / len(clip_counts)))
    raw = [frequency ** -config.temperature for frequency in frequencies]
    mean = sum(raw) / len(raw)
    relative = [value / mean for value in raw]
    if config.max_weight is not None:
        relative = [min(value, config.max_weight) for value in relative]
    scale = len(relative) / sum(relative)
    return [value * scale for value in relative]


def assign_sample_weights(rows: list[dict], config: BalanceConfig) -> list[dict]:
    """Fill `sample_weight` in place: balanced weights for kept clips, 0 for the others."""
    kept = [row for row in rows if row.get("keep", True)]
    weights = balance_weights([clip_tags(row) for row in kept], config)
    for row in rows:
        row["sample_weight"] = 0.0
    for row, weight in zip(kept, weights):
        row["sample_weight"] = weight
    return rows
