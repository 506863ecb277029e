"""Tests for the multi-stage pre-training curriculum (seed §4.2.2)."""

import json

import pytest

from mugen.errors import MugenError
from mugen.train.curriculum import (
    CurriculumConfig,
    CurriculumSchedule,
    CurriculumStage,
    report_defaults,
)


def _two_stage_config(max_steps: int = 11) -> CurriculumConfig:
    return CurriculumConfig(
        stages=[
            CurriculumStage(
                name="mix",
                manifests={"images": 1.0, "videos_360p_2s": 3.0},
                image_manifests=["images"],
                image_ratio_start=0.7,
                image_ratio_end=0.1,
                max_steps=max_steps,
            ),
            CurriculumStage(
                name="plateau",
                manifests={"videos_360p_5s": 1.0},
                first_frame_cond_prob=0.2,
                plateau_patience=2,
                plateau_min_delta=0.01,
            ),
            CurriculumStage(name="final", manifests={"videos_720p_5s": 1.0}, first_frame_cond_prob=0.2),
        ]
    )


def test_image_ratio_anneals_linearly_from_start_to_end():
    schedule = CurriculumSchedule(_two_stage_config(max_steps=11))
    assert schedule.image_ratio() == pytest.approx(0.7)
    schedule.advance(5)  # step 5 of 0..10 is the middle
    assert schedule.image_ratio() == pytest.approx(0.4)
    schedule.advance(5)  # step 10 is the stage's last
    assert schedule.stage_index == 0
    assert schedule.image_ratio() == pytest.approx(0.1)
    probabilities = schedule.source_probabilities()
    assert probabilities["images"] == pytest.approx(0.1)
    assert probabilities["videos_360p_2s"] == pytest.approx(0.9)


def test_source_probabilities_split_video_share_by_weight():
    stage = CurriculumStage(
        name="s", manifests={"img": 2.0, "a": 1.0, "b": 3.0}, image_manifests=["img"], image_ratio_start=0.5,
        image_ratio_end=0.5,
    )
    probabilities = CurriculumSchedule(CurriculumConfig([stage])).source_probabilities()
    assert probabilities == pytest.approx({"img": 0.5, "a": 0.125, "b": 0.375})


def test_transition_at_max_steps():
    schedule = CurriculumSchedule(_two_stage_config(max_steps=4))
    assert [schedule.advance() for _ in range(3)] == [False, False, False]
    assert schedule.stage.name == "mix" and schedule.step_in_stage == 3
    assert schedule.advance() is True
    assert schedule.stage.name == "plateau" and schedule.step_in_stage == 0
    assert schedule.first_frame_cond_prob() == pytest.approx(0.2)
    assert schedule.image_ratio() == 0.0
    assert schedule.total_steps == 4


def test_advance_by_many_steps_carries_over_into_next_stage():
    schedule = CurriculumSchedule(_two_stage_config(max_steps=4))
    assert schedule.advance(7) is True
    assert schedule.stage_index == 1 and schedule.step_in_stage == 3 and schedule.total_steps == 7


def test_plateau_transition_with_patience_and_min_delta():
    schedule = CurriculumSchedule(_two_stage_config(max_steps=1))
    schedule.advance()
    assert schedule.stage.name == "plateau"
    # 1.0 best; 0.995 is within min_delta (not an improvement, 1 report); 0.98 improves (reset);
    # 0.975 and 0.972 are within min_delta of 0.98 -> 2 reports without improvement -> plateau.
    losses = [1.0, 0.995, 0.98, 0.975, 0.972]
    results = [schedule.report_validation_loss(loss) for loss in losses]
    assert results == [False, False, False, False, True]
    assert schedule.stage.name == "final"
    # The last stage has no plateau rule; reports change nothing.
    assert schedule.report_validation_loss(5.0) is False and schedule.stage.name == "final"


def test_plateau_on_last_stage_finishes_curriculum():
    config = CurriculumConfig([CurriculumStage(name="only", manifests={"v": 1.0}, plateau_patience=1)])
    schedule = CurriculumSchedule(config)
    assert schedule.report_validation_loss(1.0) is False
    assert schedule.report_validation_loss(1.5) is False  # no next stage to move to
    assert schedule.finished and schedule.stage.name == "only"


def test_non_finite_validation_loss_is_rejected():
    schedule = CurriculumSchedule(_two_stage_config())
    with pytest.raises(MugenError, match="not finite"):
        schedule.report_validation_loss(float("nan"))


def _run(schedule: CurriculumSchedule, events: list) -> list[tuple]:
    """Apply events ('step' or a loss) and record (stage, step, ratio, transitioned) after each."""
    trace = []
    for event in events:
        changed = schedule.advance() if event == "step" else schedule.report_validation_loss(event)
        trace.append((schedule.stage_index, schedule.step_in_stage, schedule.image_ratio(), changed))
    return trace


def test_resume_from_state_dict_continues_identically():
    events = ["step"] * 6 + ["step"] * 6 + [1.0, "step", 0.9, "step", 0.95, "step", "step", 0.96, "step", "step"]
    uninterrupted = CurriculumSchedule(_two_stage_config(max_steps=10))
    full_trace = _run(uninterrupted, events)

    # Mid-stage 1 (step 6 of 10).
    first = CurriculumSchedule(_two_stage_config(max_steps=10))
    head = _run(first, events[:6])
    state = json.loads(json.dumps(first.state_dict()))
    resumed = CurriculumSchedule(_two_stage_config(max_steps=10))
    resumed.load_state_dict(state)
    assert (resumed.stage_index, resumed.step_in_stage) == (0, 6)
    assert resumed.image_ratio() == pytest.approx(first.image_ratio())
    assert head + _run(resumed, events[6:]) == full_trace
    assert full_trace[9][3] is True  # the 10th step moved to stage 2, in both runs

    # Mid-stage 2, after validation reports (the plateau counter must survive the resume).
    cut = 16
    first = CurriculumSchedule(_two_stage_config(max_steps=10))
    head = _run(first, events[:cut])
    resumed = CurriculumSchedule(_two_stage_config(max_steps=10))
    resumed.load_state_dict(first.state_dict())
    tail = _run(resumed, events[cut:])
    assert head + tail == full_trace
    assert any(changed for (_, _, _, changed) in tail)  # the plateau transition happens after the resume


def test_load_state_dict_rejects_other_curriculum():
    schedule = CurriculumSchedule(_two_stage_config())
    other = CurriculumSchedule(CurriculumConfig([CurriculumStage(name="x", manifests={"v": 1.0})]))
    with pytest.raises(MugenError, match="differ"):
        other.load_state_dict(schedule.state_dict())


def test_to_dict_from_dict_round_trip():
    for config in (_two_stage_config(), report_defaults()):
        data = json.loads(json.dumps(config.to_dict()))
        assert CurriculumConfig.from_dict(data) == config


def test_from_dict_unknown_keys_are_named():
    data = _two_stage_config().to_dict()
    data["stages"][1]["patience"] = 3
    with pytest.raises(MugenError, match="patience"):
        CurriculumConfig.from_dict(data)
    with pytest.raises(MugenError, match="extra"):
        CurriculumConfig.from_dict({"stages": [], "extra": 1})
    with pytest.raises(MugenError, match="manifests"):
        CurriculumConfig.from_dict({"stages": [{"name": "a"}]})


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: CurriculumConfig([]), "at least one stage"),
        (lambda: CurriculumStage(name="a", manifests={"v": 1.0}, image_ratio_start=1.2, max_steps=3), "image_ratio_start"),
        (lambda: CurriculumStage(name="a", manifests={"v": 1.0}, image_ratio_end=-0.1, max_steps=3), "image_ratio_end"),
        (lambda: CurriculumStage(name="a", manifests={"v": 1.0}, first_frame_cond_prob=2.0), "first_frame_cond_prob"),
        (lambda: CurriculumStage(name="a", manifests={}), "manifests"),
        (lambda: CurriculumStage(name="a", manifests={"v": -1.0}), "weight"),
        (lambda: CurriculumStage(name="a", manifests={"v": 1.0}, max_steps=0), "max_steps"),
        (lambda: CurriculumStage(name="a", manifests={"v": 1.0}, image_ratio_start=0.5), "no length"),
        (lambda: CurriculumStage(name="a", manifests={"v": 1.0}, image_manifests=["img"]), "image_manifests"),
        (
            lambda: CurriculumConfig(
                [CurriculumStage(name="a", manifests={"v": 1.0}), CurriculumStage(name="b", manifests={"v": 1.0})]
            ),
            "never ends",
        ),
        (
            lambda: CurriculumConfig(
                [CurriculumStage(name="a", manifests={"v": 1.0}, max_steps=2), CurriculumStage(name="a", manifests={"v": 1.0})]
            ),
            "more than once",
        ),
    ],
)
def test_validation_errors(build, message):
    with pytest.raises(MugenError, match=message):
        build()


def test_report_defaults_follow_the_report_shape():
    config = report_defaults()
    assert len(config.stages) == 3
    stage1, stage2, stage3 = config.stages
    assert stage1.image_ratio_start > stage1.image_ratio_end and stage1.first_frame_cond_prob == 0.0
    assert stage2.plateau_patience is not None and stage2.first_frame_cond_prob > 0
    assert stage3.first_frame_cond_prob > 0
    schedule = CurriculumSchedule(config)
    assert schedule.source_probabilities()["manifests/images.parquet"] == pytest.approx(stage1.image_ratio_start)
