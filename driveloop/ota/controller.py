"""The rollout controller: a pure state machine, replayable from its event log.

A :class:`RolloutPlan` lists stages (default shadow → canary 1 % → 10 % → 50 % → 100 %). Each health
evaluation calls :func:`decide` with the stage's aggregated :class:`~driveloop.ota.gates.HealthWindow`
and the time; the gate verdict turns into one :class:`Decision`:

| gate verdict | decision |
|---|---|
| FAIL | ABORT: the rollout stops for good; the director reverts every vehicle on the release |
| INCONCLUSIVE: too few samples, or no comparison group | HOLD while it lasts (exposure does not grow) |
| INCONCLUSIVE: a metric above its limit, not significantly | HOLD (1); the ``max_inconclusive``-th → ABORT (2) |
| PASS before ``min_duration_s`` and ``min_evaluations`` windows | HOLD |
| PASS after them | PROMOTE (COMPLETE after the last stage) |

(1) A stage's window is cumulative, so each hold adds evidence. (2) The bounded rule: a model that has
not shown itself within tolerance after that many windows is rolled back — the burden of proof is on
the new model, and a stage never keeps a suspicious model on its cohort indefinitely.

The gate itself is picked by the plan's ``gate_rules`` (:data:`GATE_RULES`): logs recorded before a
rules change replay under the rules they were decided by.

Operators :func:`apply` pause / resume / promote / abort; illegal transitions raise
:class:`~driveloop.core.exceptions.RolloutStateError` and leave the state as it was. Nothing here reads a
clock, a file or the network: :func:`replay` over the recorded events rebuilds the exact state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Any

from driveloop.core.exceptions import ConfigError, RolloutStateError
from driveloop.ota import _gates_v1, gates
from driveloop.ota.gates import CohortStats, GateResult, GateTolerances, HealthWindow, Verdict

__all__ = ["StageSpec", "RolloutPlan", "RolloutState", "Status", "Action", "Decision", "OperatorAction",
           "OPERATOR_ACTIONS", "RolloutEvent", "GateRules", "GATE_RULES", "CURRENT_GATE_RULES", "LEGACY_GATE_RULES",
           "start", "decide", "apply", "replay", "plan_of"]


@dataclass(frozen=True)
class GateRules:
    """One version of the health-gate rules: the gates, which control stats later stages compare with,
    and whether statistically inconclusive windows are bounded."""

    active: Callable[[HealthWindow, GateTolerances, CohortStats | None], GateResult]
    shadow: Callable[[HealthWindow, GateTolerances], GateResult]
    baseline_after: Callable[[HealthWindow, GateTolerances, CohortStats | None], CohortStats | None]
    bounded_holds: bool


def _baseline_after(window: HealthWindow, tol: GateTolerances, baseline: CohortStats | None) -> CohortStats | None:
    """What the promoting gate compared with (the stage's control, or it pooled with the baseline)."""
    ref = gates.reference(window, tol, baseline)
    return baseline if ref is None else ref


LEGACY_GATE_RULES = 1  # what a logged plan without ``gate_rules`` was decided by (every log before rules 2)
CURRENT_GATE_RULES = 3
# gate_rules of a plan -> its rules. 1: the control's observed rate taken as exact (frozen in
# _gates_v1); 2: exact two-exposure tests, pooled references, bounded holds; 3: 2 + a minimum of distinct
# control vehicles (windows aggregated per vehicle, weights bounded). Never change a published entry.
GATE_RULES: Mapping[int, GateRules] = MappingProxyType({
    LEGACY_GATE_RULES: GateRules(_gates_v1.evaluate_active, _gates_v1.evaluate_shadow, _gates_v1.baseline_after,
                                 bounded_holds=False),
    2: GateRules(gates.evaluate_active, gates.evaluate_shadow, _baseline_after, bounded_holds=True),
    CURRENT_GATE_RULES: GateRules(gates.evaluate_active_v3, gates.evaluate_shadow, _baseline_after,
                                  bounded_holds=True),
})


class Status(str, Enum):
    RUNNING = "running"
    PAUSED = "paused"
    ABORTED = "aborted"
    COMPLETED = "completed"


class Action(str, Enum):
    HOLD = "hold"
    PROMOTE = "promote"
    COMPLETE = "complete"
    ABORT = "abort"
    NONE = "none"  # the rollout is over; nothing to decide


@dataclass(frozen=True)
class StageSpec:
    """One stage: which fraction of the fleet gets the release and how much evidence promotion needs."""

    name: str
    fraction: float
    shadow: bool = False
    min_duration_s: float = 900.0
    min_evaluations: int = 2
    tolerances: GateTolerances = field(default_factory=GateTolerances)
    max_inconclusive: int = 6  # statistically inconclusive windows a stage may hold for, then it aborts

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 32:
            raise ConfigError(f"stage name must be 1..32 characters, got {self.name!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"stage {self.name}: fraction must be in (0, 1], got {self.fraction}")
        if not self.min_duration_s >= 0.0:
            raise ConfigError(f"stage {self.name}: min_duration_s must be >= 0, got {self.min_duration_s}")
        if self.min_evaluations < 1:
            raise ConfigError(f"stage {self.name}: min_evaluations must be >= 1, got {self.min_evaluations}")
        if self.max_inconclusive < 1:
            raise ConfigError(f"stage {self.name}: max_inconclusive must be >= 1, got {self.max_inconclusive}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageSpec:
        d = dict(d)
        tol = d.pop("tolerances", None) or {}
        try:
            return cls(**d, tolerances=GateTolerances(**tol))
        except TypeError as e:
            raise ConfigError(f"bad stage spec: {e}") from e


@dataclass(frozen=True)
class RolloutPlan:
    """Ordered stages. Shadow stages come first; exposure never shrinks; the last stage is 100 % active.
    ``gate_rules``: the key of :data:`GATE_RULES` its health evaluations are decided by."""

    stages: tuple[StageSpec, ...]
    gate_rules: int = CURRENT_GATE_RULES

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("a rollout plan needs at least one stage")
        if self.gate_rules not in GATE_RULES:
            raise ConfigError(f"unknown gate_rules {self.gate_rules!r} (known: {', '.join(map(str, GATE_RULES))})")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique: {names}")
        seen_active = False
        for prev, cur in zip(self.stages, self.stages[1:], strict=False):
            if cur.fraction < prev.fraction:
                raise ConfigError(f"stage {cur.name} exposes less than {prev.name}; exposure must not shrink")
        for s in self.stages:
            if s.shadow and seen_active:
                raise ConfigError(f"shadow stage {s.name} must come before every active stage")
            seen_active = seen_active or not s.shadow
        last = self.stages[-1]
        if last.shadow or last.fraction != 1.0:
            raise ConfigError("the last stage must expose 100 % of the fleet, actively")

    @classmethod
    def default(cls, min_duration_s: float = 900.0, min_evaluations: int = 2,
                tolerances: GateTolerances | None = None) -> RolloutPlan:
        tol = tolerances or GateTolerances()
        # the canary is the first time the model actuates: it gets at least 3 windows of evidence
        spec = [("shadow", 0.01, True, 1), ("canary", 0.01, False, 3), ("10%", 0.10, False, 1),
                ("50%", 0.50, False, 1), ("100%", 1.0, False, 1)]
        return cls(tuple(StageSpec(n, f, sh, min_duration_s, max(min_evaluations, k), tol) for n, f, sh, k in spec))

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages], "gate_rules": self.gate_rules}

    @classmethod
    def from_dict(cls, d: dict[str, Any], default_gate_rules: int = CURRENT_GATE_RULES) -> RolloutPlan:
        """``default_gate_rules``: for a dict that does not name them — a new plan gets the current rules,
        a plan read back from an event log written before they had a name gets rules 1."""
        try:
            rules = d.get("gate_rules", default_gate_rules)
            stages = tuple(StageSpec.from_dict(s) for s in d["stages"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"bad rollout plan: {e!r}") from e
        if type(rules) is not int:  # not a bool, not "2", not 2.0
            raise ConfigError(f"bad rollout plan: gate_rules must be an integer, got {rules!r}")
        return cls(stages, rules)


@dataclass(frozen=True)
class Decision:
    action: Action
    stage: str
    to_stage: str | None
    reason: str
    at_s: float
    gate: GateResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action.value, "stage": self.stage, "to_stage": self.to_stage, "reason": self.reason,
                "at_s": self.at_s, "gate": self.gate.to_dict() if self.gate else None}


@dataclass(frozen=True)
class RolloutState:
    rollout_id: int
    version: str
    previous_version: str
    status: Status
    stage_index: int
    stage_entered_s: float
    evaluations_in_stage: int = 0
    inconclusive_in_stage: int = 0  # windows held because a metric was above its limit, not significantly
    max_fraction: float = 0.0  # the largest fraction ever exposed (shadow included)
    baseline: CohortStats | None = None  # control stats kept for stages without a control group
    reason: str = ""
    last_decision: Decision | None = None
    last_event_s: float = 0.0

    def stage(self, plan: RolloutPlan) -> StageSpec:
        return plan.stages[self.stage_index]

    @property
    def active(self) -> bool:
        return self.status in (Status.RUNNING, Status.PAUSED)


@dataclass(frozen=True)
class OperatorAction:
    kind: str  # a key of OPERATOR_ACTIONS: pause | resume | promote | abort
    at_s: float
    actor: str = "operator"
    reason: str = ""


def start(rollout_id: int, version: str, previous_version: str, plan: RolloutPlan, now_s: float) -> RolloutState:
    """A new rollout, in its first stage."""
    if version == previous_version:
        raise ConfigError(f"version {version} is already the previous version")
    return RolloutState(rollout_id, version, previous_version, Status.RUNNING, 0, now_s,
                        max_fraction=plan.stages[0].fraction, reason="started", last_event_s=now_s)


def _tick(state: RolloutState, now_s: float) -> None:
    if now_s < state.last_event_s:
        raise RolloutStateError(f"time went backwards: {now_s} < {state.last_event_s}")


def _advance(state: RolloutState, plan: RolloutPlan, window: HealthWindow | None, now_s: float, reason: str,
             gate: GateResult | None) -> tuple[RolloutState, Decision]:
    """Promote to the next stage, or complete after the last; remember control stats as the baseline."""
    cur = state.stage(plan)
    baseline = state.baseline
    if window is not None:
        baseline = GATE_RULES[plan.gate_rules].baseline_after(window, cur.tolerances, baseline)
    if state.stage_index + 1 >= len(plan.stages):
        d = Decision(Action.COMPLETE, cur.name, None, reason, now_s, gate)
        return replace(state, status=Status.COMPLETED, baseline=baseline, reason=reason, last_decision=d,
                       last_event_s=now_s), d
    nxt = plan.stages[state.stage_index + 1]
    d = Decision(Action.PROMOTE, cur.name, nxt.name, reason, now_s, gate)
    return replace(state, stage_index=state.stage_index + 1, stage_entered_s=now_s, evaluations_in_stage=0,
                   inconclusive_in_stage=0, max_fraction=max(state.max_fraction, nxt.fraction), baseline=baseline,
                   reason=reason, last_decision=d, last_event_s=now_s), d


def decide(state: RolloutState, plan: RolloutPlan, window: HealthWindow, now_s: float) -> tuple[RolloutState, Decision]:
    """One health evaluation of the current stage. ``window``: the stage's stats since it was entered."""
    _tick(state, now_s)
    stage = state.stage(plan)
    if not state.active:
        return state, Decision(Action.NONE, stage.name, None, f"rollout {state.status.value}", now_s)
    if state.status is Status.PAUSED:
        d = Decision(Action.HOLD, stage.name, None, "paused by operator", now_s)
        return replace(state, last_decision=d, last_event_s=now_s), d
    rules = GATE_RULES[plan.gate_rules]
    gate = rules.shadow(window, stage.tolerances) if stage.shadow else \
        rules.active(window, stage.tolerances, state.baseline)
    n = state.evaluations_in_stage + 1
    unsure = gate.unsure() if rules.bounded_holds and gate.verdict is Verdict.INCONCLUSIVE else []
    k = state.inconclusive_in_stage + (1 if unsure else 0)
    if gate.verdict is Verdict.FAIL or (unsure and k >= stage.max_inconclusive):
        reason = f"health gate failed in {stage.name}: {gate.reason}" if gate.verdict is Verdict.FAIL else \
            (f"still inconclusive in {stage.name} after {k} windows: {', '.join(unsure)} above the limit, "
             "never shown within it")
        d = Decision(Action.ABORT, stage.name, None, reason, now_s, gate)
        return replace(state, status=Status.ABORTED, evaluations_in_stage=n, inconclusive_in_stage=k, reason=reason,
                       last_decision=d, last_event_s=now_s), d
    if gate.verdict is Verdict.INCONCLUSIVE:
        bound = f" ({k}/{stage.max_inconclusive} inconclusive windows)" if unsure else ""
        d = Decision(Action.HOLD, stage.name, None, f"inconclusive: {gate.reason}{bound}", now_s, gate)
        return replace(state, evaluations_in_stage=n, inconclusive_in_stage=k, last_decision=d,
                       last_event_s=now_s), d
    elapsed = now_s - state.stage_entered_s
    if elapsed < stage.min_duration_s or n < stage.min_evaluations:
        reason = (f"healthy, waiting: {elapsed:.0f}/{stage.min_duration_s:.0f} s, "
                  f"{n}/{stage.min_evaluations} windows")
        d = Decision(Action.HOLD, stage.name, None, reason, now_s, gate)
        return replace(state, evaluations_in_stage=n, last_decision=d, last_event_s=now_s), d
    return _advance(replace(state, evaluations_in_stage=n), plan, window, now_s,
                    f"health gate passed in {stage.name}", gate)


# An operator action's handler: (state, plan, at_s, who) -> the new state; raises RolloutStateError when
# illegal. ``apply`` has already checked that the rollout is active.
OperatorHandler = Callable[[RolloutState, RolloutPlan, float, str], RolloutState]


def _pause(state: RolloutState, plan: RolloutPlan, at_s: float, who: str) -> RolloutState:
    if state.status is Status.PAUSED:
        raise RolloutStateError(f"cannot pause: rollout {state.rollout_id} is already paused")
    d = Decision(Action.HOLD, state.stage(plan).name, None, f"paused by {who}", at_s)
    return replace(state, status=Status.PAUSED, reason=d.reason, last_decision=d, last_event_s=at_s)


def _resume(state: RolloutState, plan: RolloutPlan, at_s: float, who: str) -> RolloutState:
    if state.status is not Status.PAUSED:
        raise RolloutStateError(f"cannot resume: rollout {state.rollout_id} is not paused")
    d = Decision(Action.HOLD, state.stage(plan).name, None, f"resumed by {who}", at_s)
    return replace(state, status=Status.RUNNING, reason=d.reason, last_decision=d, last_event_s=at_s)


def _promote(state: RolloutState, plan: RolloutPlan, at_s: float, who: str) -> RolloutState:
    return _advance(state, plan, None, at_s, f"promoted by {who}", None)[0]


def _abort(state: RolloutState, plan: RolloutPlan, at_s: float, who: str) -> RolloutState:
    d = Decision(Action.ABORT, state.stage(plan).name, None, f"aborted by {who}", at_s)
    return replace(state, status=Status.ABORTED, reason=d.reason, last_decision=d, last_event_s=at_s)


# Operator action name -> handler: the one list of operator actions (apply, the fleet server's routes).
# Its order is that of the valid names in error messages.
OPERATOR_ACTIONS: Mapping[str, OperatorHandler] = MappingProxyType({
    "pause": _pause, "resume": _resume, "promote": _promote, "abort": _abort,
})


def apply(state: RolloutState, plan: RolloutPlan, action: OperatorAction) -> RolloutState:
    """An operator's pause / resume / promote / abort; illegal ones raise RolloutStateError."""
    _tick(state, action.at_s)
    who = f"{action.actor}: {action.reason}" if action.reason else action.actor
    if not state.active:
        raise RolloutStateError(f"cannot {action.kind}: rollout {state.rollout_id} is {state.status.value}")
    handler = OPERATOR_ACTIONS.get(action.kind)
    if handler is None:
        raise RolloutStateError(f"unknown operator action {action.kind!r} ({', '.join(OPERATOR_ACTIONS)})")
    return handler(state, plan, action.at_s, who)


@dataclass(frozen=True)
class RolloutEvent:
    """One entry of the event log: ``start`` {rollout_id, version, previous_version, plan},
    ``evaluate`` {window}, or ``operator`` {kind, actor, reason}."""

    kind: str
    at_s: float
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "at_s": self.at_s, "data": self.data}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutEvent:
        return cls(d["kind"], float(d["at_s"]), d["data"])


def plan_of(events: Iterable[RolloutEvent]) -> RolloutPlan:
    for e in events:
        if e.kind == "start":
            return RolloutPlan.from_dict(e.data["plan"], default_gate_rules=LEGACY_GATE_RULES)
    raise RolloutStateError("event log has no start event")


def replay(events: Iterable[RolloutEvent]) -> RolloutState:
    """Rebuild the state by re-running every recorded evaluation and operator action in order."""
    it = iter(events)
    first = next(it, None)
    if first is None or first.kind != "start":
        raise RolloutStateError("event log must begin with a start event")
    d = first.data
    plan = RolloutPlan.from_dict(d["plan"], default_gate_rules=LEGACY_GATE_RULES)
    state = start(int(d["rollout_id"]), d["version"], d["previous_version"], plan, first.at_s)
    for e in it:
        if e.kind == "evaluate":
            state, _ = decide(state, plan, HealthWindow.from_dict(e.data["window"]), e.at_s)
        elif e.kind == "operator":
            state = apply(state, plan, OperatorAction(e.data["kind"], e.at_s, e.data.get("actor", "operator"),
                                                      e.data.get("reason", "")))
        else:
            raise RolloutStateError(f"unknown event kind {e.kind!r}")
    return state
