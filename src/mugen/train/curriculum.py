"""Multi-stage pre-training curriculum (seed §4.2.2).

The report trains in three stages: (1) images mixed with 360p 2 s clips, the image share annealed
until video dominates; (2) 360p with clips lengthened from 2 s to 5 s, first-frame masking on,
until the validation loss plateaus; (3) 5 s clips at 720p from a curated high-quality set,
first-frame masking on. This file holds the stage description (`CurriculumStage`), the list of
stages (`CurriculumConfig`) and the state machine that walks them (`CurriculumSchedule`).

Steps: ``step_in_stage`` counts the optimizer steps already taken in the current stage (0 before
the first). A stage with ``max_steps = N`` runs steps 0 .. N-1, and the N-th call of ``advance``
moves to the next stage. The image share is annealed linearly so that step 0 sees
``image_ratio_start`` and step N-1 (the stage's last) sees ``image_ratio_end``.

Plateau: each ``report_validation_loss`` compares the loss with the best seen in this stage; a
loss lower than ``best - plateau_min_delta`` is an improvement. After ``plateau_patience`` reports
in a row without one, the stage ends.

The schedule is pure Python (no torch), so it checkpoints as a small JSON-friendly dict.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mugen.errors import MugenError


@dataclass
class CurriculumStage:
    """One stage of the curriculum.

    ``manifests`` maps a source manifest path to its sampling weight. ``image_ratio_start`` /
    ``image_ratio_end`` give the share of samples that are images, annealed linearly over
    ``anneal_steps`` (default: ``max_steps``). ``image_manifests`` names which keys of
    ``manifests`` hold images; it is only needed by ``source_probabilities`` when the image share
    is above 0. A stage ends after ``max_steps`` steps, or when the validation loss has not
    improved by ``plateau_min_delta`` for ``plateau_patience`` reports, whichever comes first.
    """

    name: str
    manifests: dict[str, float]
    image_ratio_start: float = 0.0
    image_ratio_end: float = 0.0
    first_frame_cond_prob: float = 0.0
    max_steps: int | None = None
    plateau_patience: int | None = None
    plateau_min_delta: float = 0.0
    anneal_steps: int | None = None
    image_manifests: list[str] | None = None

    def __post_init__(self) -> None:
        where = f"curriculum stage {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise MugenError(f"curriculum stage name={self.name!r} must be a non-empty string; give each stage a name")
        if not isinstance(self.manifests, dict) or not self.manifests:
            raise MugenError(f"{where}: manifests must be a non-empty dict of manifest path -> sampling weight")
        for path, weight in self.manifests.items():
            if not isinstance(path, str) or not path:
                raise MugenError(f"{where}: manifest key {path!r} must be a non-empty path string")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise MugenError(f"{where}: weight of manifest {path!r} is {weight!r}; use a finite number >= 0")
        if sum(self.manifests.values()) <= 0:
            raise MugenError(f"{where}: all manifest weights are 0; give at least one source a positive weight")
        for key in ("image_ratio_start", "image_ratio_end", "first_frame_cond_prob"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise MugenError(f"{where}: {key}={value!r} must be a number between 0 and 1")
        for key in ("max_steps", "plateau_patience", "anneal_steps"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MugenError(f"{where}: {key}={value!r} must be a whole number >= 1, or left out")
        if isinstance(self.plateau_min_delta, bool) or not isinstance(self.plateau_min_delta, (int, float)) or not (
            math.isfinite(self.plateau_min_delta) and self.plateau_min_delta >= 0
        ):
            raise MugenError(f"{where}: plateau_min_delta={self.plateau_min_delta!r} must be a finite number >= 0")
        if self.image_ratio_start != self.image_ratio_end and self.annealing_steps is None:
            raise MugenError(
                f"{where}: image ratio is annealed from {self.image_ratio_start} to {self.image_ratio_end} but the stage has "
                "no length; set max_steps or anneal_steps"
            )
        if self.image_manifests is not None:
            unknown = [path for path in self.image_manifests if path not in self.manifests]
            if unknown:
                raise MugenError(f"{where}: image_manifests {unknown} are not keys of manifests; list only manifest paths")

    @property
    def annealing_steps(self) -> int | None:
        """Steps over which the image share moves from start to end (``anneal_steps`` or ``max_steps``)."""
        return self.anneal_steps if self.anneal_steps is not None else self.max_steps

    def image_ratio_at(self, step_in_stage: int) -> float:
        """Image share of samples at ``step_in_stage`` (seed §4.2.2: image-to-video ratio annealed)."""
        steps = self.annealing_steps
        if steps is None or self.image_ratio_start == self.image_ratio_end:
            return float(self.image_ratio_start)
        progress = min(1.0, step_in_stage / max(1, steps - 1))  # 0 at the first step, 1 at the last
        return float(self.image_ratio_start + (self.image_ratio_end - self.image_ratio_start) * progress)


@dataclass
class CurriculumConfig:
    """The ordered stages of pre-training (seed §4.2.2)."""

    stages: list[CurriculumStage] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.stages:
            raise MugenError("curriculum: stages is empty; give at least one stage")
        names = [stage.name for stage in self.stages]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise MugenError(f"curriculum: stage names {duplicates} are used more than once; give each stage its own name")
        for stage in self.stages[:-1]:
            if stage.max_steps is None and stage.plateau_patience is None:
                raise MugenError(
                    f"curriculum stage {stage.name!r} is not the last stage but never ends; set max_steps or plateau_patience"
                )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict that ``from_dict`` reads back."""
        return {"stages": [dataclasses.asdict(stage) for stage in self.stages]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurriculumConfig:
        """Build a config from a dict (e.g. parsed JSON); unknown keys are an error."""
        if not isinstance(data, dict):
            raise MugenError(f"curriculum: expected a dict with key 'stages', got {type(data).__name__}")
        unknown = sorted(set(data) - {"stages"})
        if unknown:
            raise MugenError(f"curriculum: unknown keys {unknown}; the only key is 'stages'")
        raw_stages = data.get("stages")
        if not isinstance(raw_stages, list):
            raise MugenError("curriculum: 'stages' must be a list of stage dicts")
        stage_keys = {f.name for f in dataclasses.fields(CurriculumStage)}
        required = {f.name for f in dataclasses.fields(CurriculumStage) if f.default is dataclasses.MISSING}
        stages = []
        for index, raw in enumerate(raw_stages):
            if not isinstance(raw, dict):
                raise MugenError(f"curriculum: stage {index} must be a dict, got {type(raw).__name__}")
            unknown = sorted(set(raw) - stage_keys)
            if unknown:
                raise MugenError(f"curriculum: stage {index} has unknown keys {unknown}; allowed keys are {sorted(stage_keys)}")
            missing = sorted(required - set(raw))
            if missing:
                raise MugenError(f"curriculum: stage {index} is missing keys {missing}")
            values = dict(raw)
            if isinstance(values["manifests"], dict):
                values["manifests"] = dict(values["manifests"])
            if values.get("image_manifests") is not None:
                values["image_manifests"] = list(values["image_manifests"])
            stages.append(CurriculumStage(**values))
        return cls(stages=stages)


class CurriculumSchedule:
    """Walks a `CurriculumConfig`: current stage, annealed image share, stage transitions."""

    def __init__(self, config: CurriculumConfig) -> None:
        self.config = config
        self._stage_index = 0
        self._step_in_stage = 0
        self._total_steps = 0
        self._best_loss: float | None = None
        self._reports_without_improvement = 0
        self._finished = False

    @property
    def stage(self) -> CurriculumStage:
        return self.config.stages[self._stage_index]

    @property
    def stage_index(self) -> int:
        return self._stage_index

    @property
    def step_in_stage(self) -> int:
        return self._step_in_stage

    @property
    def total_steps(self) -> int:
        """Steps taken over all stages."""
        return self._total_steps

    @property
    def finished(self) -> bool:
        """True once the last stage has reached its own end condition (max_steps or plateau)."""
        return self._finished

    def image_ratio(self) -> float:
        """Image share of samples at the current step."""
        return self.stage.image_ratio_at(self._step_in_stage)

    def first_frame_cond_prob(self) -> float:
        """Probability of first-frame masking in the current stage (seed §4.2.2: on in stages 2 and 3)."""
        return float(self.stage.first_frame_cond_prob)

    def source_probabilities(self) -> dict[str, float]:
        """Probability of drawing each manifest at the current step.

        Image manifests share ``image_ratio()``, video manifests the rest, each split by weight.
        """
        stage = self.stage
        ratio = self.image_ratio()
        image_paths = set(stage.image_manifests or [])
        if ratio > 0 and not image_paths:
            raise MugenError(
                f"curriculum stage {stage.name!r}: image ratio is {ratio:.3f} but image_manifests is not set; "
                "list the image manifests"
            )
        image_weight = sum(w for p, w in stage.manifests.items() if p in image_paths)
        video_weight = sum(w for p, w in stage.manifests.items() if p not in image_paths)
        if ratio > 0 and image_weight <= 0:
            raise MugenError(f"curriculum stage {stage.name!r}: image ratio is {ratio:.3f} but image manifests have weight 0")
        if ratio < 1 and video_weight <= 0:
            raise MugenError(
                f"curriculum stage {stage.name!r}: video share is {1 - ratio:.3f} but there are no video manifests with weight > 0"
            )
        probabilities = {}
        for path, weight in stage.manifests.items():
            if path in image_paths:
                probabilities[path] = ratio * weight / image_weight if image_weight > 0 else 0.0
            else:
                probabilities[path] = (1 - ratio) * weight / video_weight if video_weight > 0 else 0.0
        return probabilities

    def advance(self, step_count: int = 1) -> bool:
        """Record ``step_count`` optimizer steps; return True if a stage transition happened.

        Steps beyond a stage's ``max_steps`` carry into the next stage.
        """
        if isinstance(step_count, bool) or not isinstance(step_count, int) or step_count < 0:
            raise MugenError(f"curriculum: advance(step_count={step_count!r}) needs a whole number >= 0")
        transitioned = False
        remaining = step_count
        while remaining > 0:
            max_steps = self.stage.max_steps
            if max_steps is None or self._finished:  # no step limit left: count every step here
                take = remaining
            else:
                take = max(1, min(remaining, max_steps - self._step_in_stage))
            self._step_in_stage += take
            self._total_steps += take
            remaining -= take
            if max_steps is not None and not self._finished and self._step_in_stage >= max_steps:
                transitioned = self._next_stage() or transitioned
        return transitioned

    def report_validation_loss(self, loss: float) -> bool:
        """Record a validation loss; return True if it ended the stage by plateau."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise MugenError(f"curriculum: validation loss {loss} is not finite; check the validation run before reporting it")
        stage = self.stage
        if stage.plateau_patience is None or self._finished:
            return False
        if self._best_loss is None or loss < self._best_loss - stage.plateau_min_delta:
            self._best_loss = loss
            self._reports_without_improvement = 0
            return False
        self._reports_without_improvement += 1
        if self._reports_without_improvement >= stage.plateau_patience:
            return self._next_stage()
        return False

    def _next_stage(self) -> bool:
        """Move to the next stage, or mark the curriculum finished after the last one."""
        self._best_loss = None
        self._reports_without_improvement = 0
        if self._stage_index + 1 >= len(self.config.stages):
            self._finished = True
            return False
        self._stage_index += 1
        self._step_in_stage = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-friendly dict for checkpoints; ``load_state_dict`` restores it exactly."""
        return {
            "stage_names": [stage.name for stage in self.config.stages],
            "stage_index": self._stage_index,
            "step_in_stage": self._step_in_stage,
            "total_steps": self._total_steps,
            "best_loss": self._best_loss,
            "reports_without_improvement": self._reports_without_improvement,
            "finished": self._finished,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"stage_names", "stage_index", "step_in_stage", "total_steps", "best_loss",
                    "reports_without_improvement", "finished"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise MugenError(f"curriculum: checkpoint state has keys {got}, expected {sorted(expected)}; is it a curriculum state?")
        names = [stage.name for stage in self.config.stages]
        if list(state["stage_names"]) != names:
            raise MugenError(
                f"curriculum: checkpoint stages {list(state['stage_names'])} differ from the config's {names}; "
                "resume with the curriculum the run started with"
            )
        if not 0 <= int(state["stage_index"]) < len(names):
            raise MugenError(f"curriculum: checkpoint stage_index={state['stage_index']} is out of range for {len(names)} stages")
        self._stage_index = int(state["stage_index"])
        self._step_in_stage = int(state["step_in_stage"])
        self._total_steps = int(state["total_steps"])
        self._best_loss = None if state["best_loss"] is None else float(state["best_loss"])
        self._reports_without_improvement = int(state["reports_without_improvement"])
        self._finished = bool(state["finished"])


def report_defaults() -> CurriculumConfig:
    """The report's three-stage curriculum (seed §4.2.2) as an example to edit.

    The report gives no step counts, ratios, probabilities or patience: every number here is an
    illustrative default, and the manifest paths are placeholders to replace with your own.
    Stage 1: images + 360p 2 s clips, image share annealed 0.7 -> 0.1, no first-frame masking.
    Stage 2: 360p, clips going from 2 s to 5 s, first-frame masking (0.2), until validation plateau.
    Stage 3: 720p 5 s clips from the curated high-quality set, first-frame masking (0.2).
    """
    images = "manifests/images.parquet"
    videos_360p_2s = "manifests/videos_360p_2s.parquet"
    videos_360p_5s = "manifests/videos_360p_5s.parquet"
    videos_720p_5s = "manifests/videos_720p_5s_hq.parquet"
    return CurriculumConfig(
        stages=[
            CurriculumStage(
                name="stage1_images_360p_2s",
                manifests={images: 1.0, videos_360p_2s: 1.0},
                image_manifests=[images],
                image_ratio_start=0.7,
                image_ratio_end=0.1,
                first_frame_cond_prob=0.0,
                max_steps=100_000,
            ),
            CurriculumStage(
                name="stage2_360p_2s_to_5s",
                manifests={videos_360p_2s: 0.3, videos_360p_5s: 0.7},
                first_frame_cond_prob=0.2,
                plateau_patience=5,
                plateau_min_delta=1e-3,
            ),
            CurriculumStage(
                name="stage3_720p_5s",
                manifests={videos_720p_5s: 1.0},
                first_frame_cond_prob=0.2,
            ),
        ]
    )
