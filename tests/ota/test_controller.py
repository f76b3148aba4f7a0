"""Rollout controller state machine, operator actions, replay, and the director on top of it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from driveloop.core.exceptions import ConfigError, RolloutStateError
from driveloop.ota.cohorts import in_cohort
from driveloop.ota.controller import OPERATOR_ACTIONS, Action, OperatorAction, RolloutEvent, RolloutPlan, RolloutState, \
    StageSpec, Status, apply, decide, plan_of, replay, start
from driveloop.ota.director import assign, assign_fleet, fleet_share
from driveloop.ota.gates import CohortStats, HealthWindow, ShadowAggregate

PLAN = RolloutPlan.default(min_duration_s=900.0, min_evaluations=2)
CONTROL = CohortStats(500, 500, 100.0, 3_600_000, 200, 0, 0, 0, 8.0 * 3_600_000)
GOOD = HealthWindow(CohortStats(10, 10, 2.0, 72_000, 4, 0, 0, 0, 8.0 * 72_000), CONTROL,
                    ShadowAggregate(10, 5000, 20, 0.05 * 5000))
BAD = HealthWindow(CohortStats(10, 10, 2.0, 72_000, 40, 0, 0, 0, 8.0 * 72_000), CONTROL)
CRASH = HealthWindow(CohortStats(10, 10, 2.0, 72_000, 4, 0, 0, 1, 8.0 * 72_000), CONTROL)
EMPTY = HealthWindow()


def fresh() -> RolloutState:
    return start(1, "v2", "v1", PLAN, 0.0)


def test_default_plan_stages() -> None:
    assert [(s.name, s.fraction, s.shadow) for s in PLAN.stages] == [
        ("shadow", 0.01, True), ("canary", 0.01, False), ("10%", 0.10, False), ("50%", 0.50, False),
        ("100%", 1.0, False)]
    assert RolloutPlan.from_dict(PLAN.to_dict()) == PLAN


BAD_PLANS = [
    ("empty", ()),
    ("shrinks", (StageSpec("a", 0.5), StageSpec("b", 0.1), StageSpec("c", 1.0))),
    ("shadow after active", (StageSpec("a", 0.1), StageSpec("s", 0.1, shadow=True), StageSpec("c", 1.0))),
    ("does not end at 100%", (StageSpec("a", 0.1), StageSpec("b", 0.5))),
    ("duplicate names", (StageSpec("a", 0.1), StageSpec("a", 1.0))),
]


@pytest.mark.parametrize("name,stages", BAD_PLANS, ids=[b[0] for b in BAD_PLANS])
def test_bad_plans_rejected(name: str, stages: tuple[StageSpec, ...]) -> None:
    with pytest.raises(ConfigError):
        RolloutPlan(stages)


@pytest.mark.parametrize("kw", [{"fraction": 0.0}, {"fraction": 1.5}, {"min_duration_s": -1.0},
                                {"min_evaluations": 0}, {"name": ""}])
def test_bad_stage_rejected(kw: dict[str, object]) -> None:
    args: dict[str, object] = {"name": "s", "fraction": 0.5} | kw
    with pytest.raises(ConfigError):
        StageSpec(**args)  # type: ignore[arg-type]


def test_good_rollout_reaches_100_percent() -> None:
    s, t, actions = fresh(), 0.0, []
    while s.status is Status.RUNNING:
        t += 600.0
        s, d = decide(s, PLAN, GOOD, t)
        actions.append(d.action)
    assert s.status is Status.COMPLETED and s.max_fraction == 1.0
    # every stage: hold (600 s < 900 s), then promote at 1200 s; the canary needs 3 windows
    assert actions == [Action.HOLD, Action.PROMOTE] + [Action.HOLD, Action.HOLD, Action.PROMOTE] + \
        [Action.HOLD, Action.PROMOTE] * 2 + [Action.HOLD, Action.COMPLETE]
    assert s.baseline == CONTROL


def test_bad_canary_aborts_and_never_grows() -> None:
    s = fresh()
    s, _ = decide(s, PLAN, GOOD, 600.0)
    s, d = decide(s, PLAN, GOOD, 1200.0)
    assert d.action is Action.PROMOTE and d.to_stage == "canary"
    s, d = decide(s, PLAN, BAD, 1800.0)
    assert d.action is Action.ABORT and s.status is Status.ABORTED
    assert d.gate is not None and d.gate.failed() == ["interventions_per_h"]
    assert s.max_fraction == 0.01 and "interventions_per_h" in s.reason
    s2, d2 = decide(s, PLAN, GOOD, 2400.0)
    assert s2 == s and d2.action is Action.NONE


def test_crash_aborts_even_before_min_samples() -> None:
    s = replace_stage(fresh(), 1)
    tiny_crash = HealthWindow(CohortStats(1, 1, 0.1, 3600, 0, 0, 0, 1, 0.0), CONTROL)
    s, d = decide(s, PLAN, tiny_crash, 600.0)
    assert d.action is Action.ABORT and d.gate is not None and d.gate.failed() == ["crashes_per_h"]


def replace_stage(s: RolloutState, i: int) -> RolloutState:
    from dataclasses import replace
    return replace(s, stage_index=i, max_fraction=PLAN.stages[i].fraction)


def test_inconclusive_holds_forever() -> None:
    s = replace_stage(fresh(), 1)
    for k in range(1, 20):
        s, d = decide(s, PLAN, EMPTY, 600.0 * k)
        assert d.action is Action.HOLD and d.reason.startswith("inconclusive")
    assert s.stage_index == 1


def test_paused_rollout_holds_and_resumes() -> None:
    s = apply(fresh(), PLAN, OperatorAction("pause", 10.0, "alice", "investigating"))
    assert s.status is Status.PAUSED and "alice" in s.reason
    for k in range(1, 4):
        s, d = decide(s, PLAN, GOOD, 600.0 * k)
        assert d.action is Action.HOLD and s.stage_index == 0
    s = apply(s, PLAN, OperatorAction("resume", 2000.0))
    s, d = decide(s, PLAN, GOOD, 2600.0)
    assert d.action is Action.HOLD  # windows while paused do not count toward min_evaluations
    s, d = decide(s, PLAN, GOOD, 3200.0)
    assert d.action is Action.PROMOTE


ILLEGAL = [
    ("resume when running", [], "resume"),
    ("pause when paused", ["pause"], "pause"),
    ("promote during abort", ["abort"], "promote"),
    ("resume during abort", ["abort"], "resume"),
    ("abort twice", ["abort"], "abort"),
    ("unknown action", [], "explode"),
]


@pytest.mark.parametrize("name,before,action", ILLEGAL, ids=[c[0] for c in ILLEGAL])
def test_illegal_operator_actions(name: str, before: list[str], action: str) -> None:
    s = fresh()
    for i, k in enumerate(before):
        s = apply(s, PLAN, OperatorAction(k, float(i + 1)))
    with pytest.raises(RolloutStateError):
        apply(s, PLAN, OperatorAction(action, 100.0))


# action, the actions before it, then: status, stage index, the decision's action and reason
OPERATOR_ROWS = [
    ("pause", [], Status.PAUSED, 0, Action.HOLD, "paused by alice: why"),
    ("resume", ["pause"], Status.RUNNING, 0, Action.HOLD, "resumed by alice: why"),
    ("promote", [], Status.RUNNING, 1, Action.PROMOTE, "promoted by alice: why"),
    ("abort", [], Status.ABORTED, 0, Action.ABORT, "aborted by alice: why"),
]


@pytest.mark.parametrize("action,before,status,stage_index,decision,reason", OPERATOR_ROWS,
                         ids=[r[0] for r in OPERATOR_ROWS])
def test_every_operator_action_maps_to_its_transition(action: str, before: list[str], status: Status, stage_index: int,
                                                      decision: Action, reason: str) -> None:
    s = fresh()
    for i, k in enumerate(before):
        s = apply(s, PLAN, OperatorAction(k, float(i + 1)))
    s = apply(s, PLAN, OperatorAction(action, 50.0, "alice", "why"))
    assert (s.status, s.stage_index, s.reason, s.last_event_s) == (status, stage_index, reason, 50.0)
    assert s.last_decision is not None and (s.last_decision.action, s.last_decision.reason) == (decision, reason)
    assert s.last_decision.stage == PLAN.stages[0].name


def test_the_operator_table_is_the_whole_vocabulary() -> None:
    assert list(OPERATOR_ACTIONS) == [r[0] for r in OPERATOR_ROWS]


@pytest.mark.parametrize("kind", ["explode", "Pause", "evaluate", ""])
def test_unknown_operator_actions_are_refused_with_the_valid_names(kind: str) -> None:
    with pytest.raises(RolloutStateError) as e:
        apply(fresh(), PLAN, OperatorAction(kind, 1.0))
    assert str(e.value) == f"unknown operator action {kind!r} (pause, resume, promote, abort)"


def test_manual_promote_through_every_stage_completes() -> None:
    s = fresh()
    for i in range(len(PLAN.stages)):
        s = apply(s, PLAN, OperatorAction("promote", float(i)))
    assert s.status is Status.COMPLETED
    with pytest.raises(RolloutStateError):
        apply(s, PLAN, OperatorAction("promote", 10.0))


def test_clock_going_backwards_rejected() -> None:
    s, _ = decide(fresh(), PLAN, GOOD, 600.0)
    with pytest.raises(RolloutStateError):
        decide(s, PLAN, GOOD, 500.0)


def test_same_version_rejected() -> None:
    with pytest.raises(ConfigError):
        start(1, "v1", "v1", PLAN, 0.0)


EVENT = st.one_of(
    st.tuples(st.just("evaluate"), st.sampled_from(["good", "bad", "crash", "empty"])),
    st.tuples(st.just("operator"), st.sampled_from(["pause", "resume", "promote", "abort"])),
)
WINDOWS = {"good": GOOD, "bad": BAD, "crash": CRASH, "empty": EMPTY}


@settings(max_examples=150, deadline=None)
@given(st.lists(EVENT, max_size=25))
def test_replay_rebuilds_the_same_state(script: list[tuple[str, str]]) -> None:
    """Drive the machine live (skipping illegal actions, as the server rejects them), log what was
    accepted, then replay the log: the state must be identical."""
    s = fresh()
    log = [RolloutEvent("start", 0.0, {"rollout_id": 1, "version": "v2", "previous_version": "v1",
                                       "plan": PLAN.to_dict()})]
    for i, (kind, arg) in enumerate(script, 1):
        t = 300.0 * i
        if kind == "evaluate":
            s, _ = decide(s, PLAN, WINDOWS[arg], t)
            log.append(RolloutEvent("evaluate", t, {"window": WINDOWS[arg].to_dict()}))
        else:
            try:
                s = apply(s, PLAN, OperatorAction(arg, t))
            except RolloutStateError:
                continue
            log.append(RolloutEvent("operator", t, {"kind": arg, "actor": "operator", "reason": ""}))
        # invariants: exposure only grows while the rollout lives; aborted never comes back
        assert s.max_fraction >= PLAN.stages[s.stage_index].fraction
    restored = replay([RolloutEvent.from_dict(e.to_dict()) for e in log])
    assert restored == s
    assert plan_of(log) == PLAN


def test_replay_needs_start() -> None:
    with pytest.raises(RolloutStateError):
        replay([RolloutEvent("evaluate", 1.0, {"window": EMPTY.to_dict()})])


FLEET = [f"veh-{i:04d}" for i in range(2000)]


def test_director_per_stage() -> None:
    s = fresh()
    shadow = fleet_share(assign_fleet(s, PLAN, FLEET))
    members = sum(in_cohort(v, 0.01) for v in FLEET)
    assert shadow == {"shadow": members, "control": len(FLEET) - members}
    a = [x for x in assign_fleet(s, PLAN, FLEET) if x.cohort == "shadow"][0]
    assert (a.version, a.shadow_version) == ("v1", "v2")
    canary = replace_stage(s, 1)
    got = {x.vehicle_id for x in assign_fleet(canary, PLAN, FLEET) if x.version == "v2"}
    assert got == {v for v in FLEET if in_cohort(v, 0.01)}
    ten = {x.vehicle_id for x in assign_fleet(replace_stage(s, 2), PLAN, FLEET) if x.version == "v2"}
    assert got < ten


def test_director_reverts_everyone_on_abort_and_keeps_exposure_on_pause() -> None:
    s = replace_stage(fresh(), 3)
    paused = apply(s, PLAN, OperatorAction("pause", 1.0))
    assert [assign(paused, PLAN, v).version for v in FLEET] == [assign(s, PLAN, v).version for v in FLEET]
    aborted = apply(s, PLAN, OperatorAction("abort", 1.0))
    assert {assign(aborted, PLAN, v).version for v in FLEET} == {"v1"}
    assert assign(None, None, "veh-1").version is None
