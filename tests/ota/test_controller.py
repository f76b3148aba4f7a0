"""Rollout controller state machine, operator actions, replay, and the director on top of it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from driveloop.core.exceptions import ConfigError, RolloutStateError
from driveloop.ota.cohorts import in_cohort
from driveloop.ota.controller import CURRENT_GATE_RULES, GATE_RULES, LEGACY_GATE_RULES, OPERATOR_ACTIONS, Action, \
    OperatorAction, RolloutEvent, RolloutPlan, RolloutState, StageSpec, Status, apply, decide, plan_of, replay, start
from driveloop.ota.director import assign, assign_fleet, fleet_share
from driveloop.ota.gates import CohortStats, GateTolerances, HealthWindow, ShadowAggregate

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
                                {"min_evaluations": 0}, {"name": ""}, {"max_inconclusive": 0}])
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


# -- gate rules: thin evidence holds, a worse canary still aborts, old logs replay as recorded ---------
TICKS_PER_S = 10


def drive(vehicles: int, seconds: float, interventions: int = 0) -> CohortStats:
    """A cohort's sums over ``seconds`` of driving in all."""
    ticks = int(seconds * TICKS_PER_S)
    return CohortStats(vehicles, vehicles, seconds / 3600.0, ticks, interventions, 0, 0, 0, 8.0 * ticks)


def per_h(rate: float, seconds: float) -> int:
    """Events a cohort at ``rate`` per hour has seen after ``seconds`` (never rounded up: no lucky extra)."""
    return math.floor(rate * seconds / 3600.0)


# The demo's plan (driveloop/demo.py demo_plan): ~8 cars, windows of seconds.
DEMO_TOL = GateTolerances(min_vehicles=1, min_hours=0.02, min_control_hours=0.02, min_shadow_ticks=200,
                          max_disagreement_rate=0.25, max_mean_abs_diff=1.0)


def demo_plan(rules: int) -> RolloutPlan:
    spec = [("shadow", 0.25, True, 1), ("canary", 0.25, False, 2), ("50%", 0.5, False, 1), ("100%", 1.0, False, 1)]
    return RolloutPlan(tuple(StageSpec(n, f, sh, 0.0, k, DEMO_TOL) for n, f, sh, k in spec), rules)


def sim_plan(rules: int) -> RolloutPlan:
    """`ota simulate`'s plan without the wait: the canary stage still needs 3 windows to promote."""
    return replace(RolloutPlan.default(min_duration_s=0.0, min_evaluations=1), gate_rules=rules)


V1_PER_H, V2_PER_H = 58.1, 3.75  # the demo: interventions per hour of v1 and v2 on the measure drive
DEMO_BASELINE = drive(6, 200.0)  # the canary stage's control: 0 interventions in 200 s


def demo_50(k: int, canary_per_h: float, first: int = 1) -> HealthWindow:
    """The demo's 50 % stage after ``k`` windows: canary 2 cars × 60 s, control 2 cars × 20 s per window;
    the canary's first event comes in window 1 (``first`` of them), later ones at ``canary_per_h``."""
    return HealthWindow(drive(2, 120.0 * k, max(first, per_h(canary_per_h, 120.0 * k))),
                        drive(2, 40.0 * k, per_h(V1_PER_H, 40.0 * k)))


def sim_canary(k: int, factor: float) -> HealthWindow:
    """`ota simulate`'s canary stage after ``k`` windows of 600 s: 10 canary vehicles at ``factor`` × the
    fleet's 2/h, 990 control vehicles at 2/h."""
    return HealthWindow(drive(10, 6000.0 * k, per_h(2.0 * factor, 6000.0 * k)),
                        drive(990, 594_000.0 * k, per_h(2.0, 594_000.0 * k)))


def run_stage(plan: RolloutPlan, stage: int, windows: list[HealthWindow],
              baseline: CohortStats | None) -> tuple[list[Action], RolloutState]:
    """Decide window after window in ``stage`` until something other than a hold happens."""
    s = replace(start(1, "v2", "v1", plan, 0.0), stage_index=stage, max_fraction=plan.stages[stage].fraction,
                baseline=baseline)
    actions = []
    for k, w in enumerate(windows, 1):
        s, d = decide(s, plan, w, 60.0 * k)
        actions.append(d.action)
        if d.action is not Action.HOLD:
            break
    return actions, s


H, P, A = Action.HOLD, Action.PROMOTE, Action.ABORT
# name, plan, stage index, windows, baseline, actions now (rules 2), actions before (rules 1)
STAGE_CASES = [
    ("1 vs 0 events in small windows holds, then the better model promotes", demo_plan, 2,
     [demo_50(k, V2_PER_H) for k in range(1, 9)], DEMO_BASELINE, [H, P], [A]),
    ("equal rates pass after enough exposure", demo_plan, 2,
     [HealthWindow(drive(2, 120.0 * k, max(5, per_h(30.0, 120.0 * k))), drive(2, 120.0 * k, per_h(30.0, 120.0 * k)))
      for k in range(1, 9)], drive(6, 200.0, 1), [H, H, H, P], [A]),
    ("a canary above the limit that never shows significance holds, then aborts at the bound", demo_plan, 2,
     [HealthWindow(drive(2, 120.0 * k, math.ceil(0.6 * k)), drive(2, 40.0 * k)) for k in range(1, 12)],
     drive(6, 200.0, 1), [H] * 5 + [A], [H, A]),
    ("0 vs 0 passes", demo_plan, 2, [HealthWindow(drive(2, 120.0), drive(2, 40.0))], DEMO_BASELINE, [P], [P]),
    ("truly worse canary (10x, demo fleet) aborts in window 1, as before", demo_plan, 2,
     [demo_50(k, 10 * V1_PER_H) for k in range(1, 9)], drive(6, 200.0, 3), [A], [A]),
    ("truly worse canary (10x, simulator fleet) aborts in window 1, as before", sim_plan, 1,
     [sim_canary(k, 10.0) for k in range(1, 9)], None, [A], [A]),
    ("the simulator's bad model (4x) aborts in window 1, as before", sim_plan, 1,
     [sim_canary(k, 4.0) for k in range(1, 9)], None, [A], [A]),
    ("3x aborts in window 1 (before: window 3)", sim_plan, 1, [sim_canary(k, 3.0) for k in range(1, 9)], None,
     [A], [H, H, A]),
    ("an equal-rate canary on the simulator fleet promotes after its 3 windows", sim_plan, 1,
     [sim_canary(k, 1.0) for k in range(1, 9)], None, [H, H, P], [H, H, P]),
]


@pytest.mark.parametrize("name,plan,stage,windows,baseline,now,before", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_stage_decisions_table(name: str, plan: object, stage: int, windows: list[HealthWindow],
                               baseline: CohortStats | None, now: list[Action], before: list[Action]) -> None:
    """Each fixture decided by the controller now (rules 2) and as before (rules 1), in the same test."""
    make = plan  # a function of the gate rules
    got_now, _ = run_stage(make(CURRENT_GATE_RULES), stage, windows, baseline)  # type: ignore[operator]
    got_before, _ = run_stage(make(LEGACY_GATE_RULES), stage, windows, baseline)  # type: ignore[operator]
    assert (got_now, got_before) == (now, before)


@pytest.mark.parametrize("fleet,factor", [("demo", 10.0), ("demo", 20.0), ("sim", 10.0), ("sim", 5.0), ("sim", 4.0),
                                          ("sim", 3.0)])
def test_truly_worse_canary_aborts_no_later_than_before(fleet: str, factor: float) -> None:
    if fleet == "demo":
        plan, stage, base = demo_plan, 2, drive(6, 200.0, per_h(V1_PER_H, 200.0))
        windows = [demo_50(k, factor * V1_PER_H) for k in range(1, 13)]
    else:
        plan, stage, base = sim_plan, 1, None
        windows = [sim_canary(k, factor) for k in range(1, 13)]
    now, _ = run_stage(plan(CURRENT_GATE_RULES), stage, windows, base)
    before, _ = run_stage(plan(LEGACY_GATE_RULES), stage, windows, base)
    assert now[-1] is A and before[-1] is A
    assert len(now) <= len(before)


def test_bounded_hold_counts_and_says_why() -> None:
    plan = demo_plan(CURRENT_GATE_RULES)
    windows = [HealthWindow(drive(2, 120.0 * k, math.ceil(0.6 * k)), drive(2, 40.0 * k)) for k in range(1, 7)]
    actions, s = run_stage(plan, 2, windows, drive(6, 200.0, 1))
    assert actions == [H] * 5 + [A] and s.inconclusive_in_stage == plan.stages[2].max_inconclusive == 6
    assert s.reason == ("still inconclusive in 50% after 6 windows: interventions_per_h above the limit, "
                        "never shown within it")
    held, _ = run_stage(plan, 2, windows[:2], drive(6, 200.0, 1))
    assert held == [H, H]
    s2 = replace(start(1, "v2", "v1", plan, 0.0), stage_index=2, baseline=drive(6, 200.0, 1))
    s2, d = decide(s2, plan, windows[0], 60.0)
    assert d.reason.endswith("(1/6 inconclusive windows)") and s2.inconclusive_in_stage == 1


def test_too_few_samples_is_not_counted_toward_the_bound() -> None:
    s = replace_stage(fresh(), 1)
    for k in range(1, 3 * PLAN.stages[1].max_inconclusive):
        s, d = decide(s, PLAN, EMPTY, 600.0 * k)
        assert d.action is Action.HOLD
    assert s.inconclusive_in_stage == 0


def test_promotion_resets_the_bound_and_pools_the_baseline() -> None:
    plan = demo_plan(CURRENT_GATE_RULES)
    s = replace(start(1, "v2", "v1", plan, 0.0), stage_index=2, max_fraction=0.5, baseline=DEMO_BASELINE,
                inconclusive_in_stage=3)
    w = HealthWindow(drive(2, 120.0), drive(2, 40.0))  # thin control: pooled with the baseline
    s, d = decide(s, plan, w, 60.0)
    assert d.action is Action.PROMOTE and s.inconclusive_in_stage == 0
    assert s.baseline == drive(2, 40.0).pooled(DEMO_BASELINE)


def _demo_log(plan_dict: dict[str, object]) -> list[RolloutEvent]:
    """The demo's rollout as its fleet server logged it: shadow, two canary windows (control: 0
    interventions in 200 s, the baseline), then the 50 % window with one canary intervention."""
    shadow = HealthWindow(shadow=ShadowAggregate(2, 400, 10, 0.05 * 400))
    canary = HealthWindow(drive(2, 100.0), DEMO_BASELINE)
    windows = [shadow, canary, canary, demo_50(1, V2_PER_H)]
    first = RolloutEvent("start", 0.0, {"rollout_id": 1, "version": "2", "previous_version": "1", "plan": plan_dict})
    return [first] + [RolloutEvent("evaluate", 60.0 * k, {"window": w.to_dict()}) for k, w in enumerate(windows, 1)]


def test_logs_written_before_gate_rules_replay_as_they_were_decided() -> None:
    """A log from before rules 2 has no ``gate_rules`` in its plan: it replays under rules 1, so the
    demo's abort stays an abort (rules 2 would hold and put v2 back on the fleet)."""
    old = demo_plan(CURRENT_GATE_RULES).to_dict()
    del old["gate_rules"]
    for stage in old["stages"]:  # nor the fields rules 2 added
        del stage["max_inconclusive"], stage["tolerances"]["count_alpha"], stage["tolerances"]["p99_min_reports"]
    assert plan_of(_demo_log(old)).gate_rules == LEGACY_GATE_RULES
    was = replay(_demo_log(old))
    assert (was.status, was.stage_index, was.baseline) == (Status.ABORTED, 2, DEMO_BASELINE)
    assert was.reason == "health gate failed in 50%: worse than allowed: interventions_per_h"
    now = replay(_demo_log(demo_plan(CURRENT_GATE_RULES).to_dict()))
    assert (now.status, now.stage_index, now.inconclusive_in_stage) == (Status.RUNNING, 2, 1)
    assert RolloutPlan.from_dict(old).gate_rules == CURRENT_GATE_RULES  # a new plan without the key: current


def test_gate_rules_are_validated_and_round_trip() -> None:
    assert PLAN.gate_rules == CURRENT_GATE_RULES and PLAN.to_dict()["gate_rules"] == CURRENT_GATE_RULES
    assert set(GATE_RULES) == {LEGACY_GATE_RULES, 2, CURRENT_GATE_RULES}
    with pytest.raises(ConfigError, match="gate_rules"):
        RolloutPlan(PLAN.stages, gate_rules=9)
    for bad in ("2", True, 2.0, None):
        with pytest.raises(ConfigError, match="gate_rules"):
            RolloutPlan.from_dict({**PLAN.to_dict(), "gate_rules": bad})
    with pytest.raises(ConfigError):
        RolloutPlan.from_dict([])  # type: ignore[arg-type]
