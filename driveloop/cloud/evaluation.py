"""Closed-loop evaluation gate: a candidate model must beat the current one on a held-out scenario suite.

Each scenario class (highway, dense, cut-in, merge, ccrs, ccrm, ccrb) is its own "unit test" with a
verdict made of named checks:

- ``collisions_zero``: the candidate never collides;
- ``interventions_kept``: its fallback interventions per hour are not above the baseline's (no class gets
  worse); for the classes an adaptation targets (``improve_classes``), ``interventions_fall`` instead: below the
  baseline's (when the baseline already has none, the candidate must have none too);
- ``progress_kept``: its progress is within ``progress_tolerance_frac`` (10 %) of the baseline's — per class,
  where a few episodes decide (in a CCR class a car stopping 3 m earlier moves it by ~5 %, and two seed sets
  of the same model differ by ~4 %); over the whole suite progress must stay within
  ``suite_progress_tolerance_frac`` (5 %);
- ``comfort_kept``: its mean |jerk| is within ``jerk_tolerance_frac`` (+ ``jerk_tolerance_abs_mps3``) of
  the baseline's, or at most ``comfort_floor_mps3``. Near-zero baselines (smooth cruising, ~0.1-0.2 m/s³)
  are why: a relative test there rejects differences of a tenth of a m/s³, far below what passengers
  feel (comfort limits in the literature are ~0.9-2 m/s³), while braking classes are judged relatively.

The suite's interventions per hour over all classes must fall, by at least ``min_suite_iph_reduction_frac``
(a suite without any must stay without). Why not "every class must fall" (the rule until 5 Dec 2026): once the
safety layer holds a model back from tailgating (``safety/headway.py``), what is left in a class such as cut-in
are interventions no model can avoid (a car cutting in close fires the cut-in rule whatever the ego does), so
candidates that cut the suite's interventions by 70 % were rejected for a class that held at 2 (docs/BENCHMARKS.md
"All four environments after the fixes"): the loop could no longer ship an improvement. No regression in any
class, and a better suite, is the release rule.
``gate`` is pure, so the decision can be tested exhaustively; ``evaluate_models`` (below) is the adapter
that runs the held-out suite in closed loop with given ONNX models, in-process or as Ray work
(``cloud.sim_exec``: one unit per class and concrete scenario). Held-out seeds start at
``HELDOUT_SEED_BASE`` and never appear in training or in the fleet's drives.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from driveloop.cloud.sim_exec import Execution, ModelPayload, SimExecutor
from driveloop.core.exceptions import ConfigError, PipelineError
from driveloop.sim.scenarios import scenario_classes

logger = logging.getLogger(__name__)

SCENARIO_CLASSES = scenario_classes()  # defined with the scenarios (sim.scenarios), environments included
HELDOUT_SEED_BASE = 1_000_000
CHECKS = ("collisions_zero", "interventions_kept", "progress_kept", "comfort_kept")  # interventions_fall when targeted


@dataclass(frozen=True)
class ClassMetrics:
    """Closed-loop results of one model on one scenario class (summed over its held-out episodes)."""

    episodes: int
    hours: float
    collisions: int
    interventions: int
    progress: float  # mean share of the route completed (or metres per episode), higher is better
    jerk_mps3: float  # mean absolute jerk, lower is better

    def __post_init__(self) -> None:
        if self.episodes < 1 or not self.hours > 0:
            raise PipelineError(f"class metrics need >= 1 episode and > 0 hours, got {self.episodes}, {self.hours}")
        if self.collisions < 0 or self.interventions < 0:
            raise PipelineError("collisions and interventions cannot be negative")
        if not (math.isfinite(self.progress) and math.isfinite(self.jerk_mps3)):
            raise PipelineError("progress and jerk must be finite")

    @property
    def interventions_per_hour(self) -> float:
        return self.interventions / self.hours

    def as_dict(self) -> dict[str, float | int]:
        return {
            "episodes": self.episodes,
            "hours": self.hours,
            "collisions": self.collisions,
            "interventions": self.interventions,
            "interventions_per_hour": self.interventions_per_hour,
            "progress": self.progress,
            "jerk_mps3": self.jerk_mps3,
        }


@dataclass(frozen=True)
class GateTolerances:
    progress_tolerance_frac: float = 0.10
    suite_progress_tolerance_frac: float = 0.05
    jerk_tolerance_frac: float = 0.10
    jerk_tolerance_abs_mps3: float = 0.1
    comfort_floor_mps3: float = 0.5  # mean |jerk| at or below this is comfortable, whatever the baseline
    min_suite_iph_reduction_frac: float = 0.0
    # None: no class's interventions may rise ("interventions_kept") and the suite's must fall. A tuple (an
    # adaptation to a shift, cloud.shift): those classes must fall ("interventions_fall"), every other may not rise.
    improve_classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.improve_classes is not None and (not self.improve_classes or not all(
                isinstance(c, str) and c in SCENARIO_CLASSES for c in self.improve_classes)):
            raise ConfigError(f"gate improve_classes must name classes of {', '.join(SCENARIO_CLASSES)}, "
                              f"got {self.improve_classes!r}")
        for name in ("progress_tolerance_frac", "suite_progress_tolerance_frac", "jerk_tolerance_frac",
                     "min_suite_iph_reduction_frac"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 <= v < 1.0):
                raise ConfigError(f"gate {name} must be a fraction in [0, 1), got {v}")
        for name in ("jerk_tolerance_abs_mps3", "comfort_floor_mps3"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"gate {name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ClassVerdict:
    scenario: str
    checks: dict[str, bool]
    baseline: ClassMetrics
    candidate: ClassMetrics

    @property
    def passed(self) -> bool:
        return all(self.checks.values())


@dataclass(frozen=True)
class GateResult:
    classes: dict[str, ClassVerdict]
    suite_iph_baseline: float
    suite_iph_candidate: float
    suite_iph_reduction_frac: float
    suite_reduction_ok: bool
    suite_progress_ok: bool = True
    reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.suite_reduction_ok and self.suite_progress_ok and all(v.passed for v in self.classes.values())

    def totals(self, which: str) -> dict[str, float | int]:
        """Suite totals of 'baseline' or 'candidate' (the pipeline's JSON report)."""
        ms = [getattr(v, which) for v in self.classes.values()]
        hours = sum(m.hours for m in ms)
        eps = sum(m.episodes for m in ms)
        return {
            "episodes": eps,
            "hours": hours,
            "collisions": sum(m.collisions for m in ms),
            "interventions": sum(m.interventions for m in ms),
            "interventions_per_hour": sum(m.interventions for m in ms) / hours,
            "progress": _episode_mean(ms, "progress"),
            "jerk_mps3": _episode_mean(ms, "jerk_mps3"),
        }

    def as_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "baseline": self.totals("baseline"),
            "candidate": self.totals("candidate"),
            "suite_iph_reduction_frac": self.suite_iph_reduction_frac,
            "suite_progress_ok": self.suite_progress_ok,
            "classes": {
                name: {
                    "passed": v.passed,
                    "checks": dict(v.checks),
                    "baseline": v.baseline.as_dict(),
                    "candidate": v.candidate.as_dict(),
                }
                for name, v in self.classes.items()
            },
            "reasons": list(self.reasons),
        }


def judge_class(scenario: str, base: ClassMetrics, cand: ClassMetrics, tol: GateTolerances) -> ClassVerdict:
    """The four checks of one scenario class (``interventions_fall`` for a class of ``tol.improve_classes``,
    ``interventions_kept`` for any other)."""
    b_iph, c_iph = base.interventions_per_hour, cand.interventions_per_hour
    target = tol.improve_classes is not None and scenario in tol.improve_classes
    checks = {
        "collisions_zero": cand.collisions == 0,
        **({"interventions_fall": c_iph < b_iph if b_iph > 0 else c_iph == 0} if target else
           {"interventions_kept": c_iph <= b_iph}),
        "progress_kept": cand.progress >= base.progress * (1.0 - tol.progress_tolerance_frac),
        "comfort_kept": cand.jerk_mps3 <= max(base.jerk_mps3 * (1.0 + tol.jerk_tolerance_frac) + tol.jerk_tolerance_abs_mps3,
                                              tol.comfort_floor_mps3),
    }
    return ClassVerdict(scenario=scenario, checks=checks, baseline=base, candidate=cand)


def _episode_mean(metrics: list[ClassMetrics], name: str) -> float:
    """Episode-weighted mean of one metric (``progress``, ``jerk_mps3``) over the suite's classes."""
    return sum(getattr(m, name) * m.episodes for m in metrics) / sum(m.episodes for m in metrics)


def gate(
    baseline_metrics: dict[str, ClassMetrics],
    candidate_metrics: dict[str, ClassMetrics],
    tolerances: GateTolerances,
) -> GateResult:
    """Verdict of candidate vs baseline on the same held-out suite (same classes, same seeds)."""
    if not baseline_metrics:
        raise PipelineError("the evaluation suite is empty")
    if set(baseline_metrics) != set(candidate_metrics):
        raise PipelineError(
            f"baseline and candidate ran different classes: {sorted(baseline_metrics)} vs {sorted(candidate_metrics)}"
        )
    classes = {
        name: judge_class(name, baseline_metrics[name], candidate_metrics[name], tolerances) for name in sorted(baseline_metrics)
    }
    b_hours = sum(m.hours for m in baseline_metrics.values())
    c_hours = sum(m.hours for m in candidate_metrics.values())
    b_iph = sum(m.interventions for m in baseline_metrics.values()) / b_hours
    c_iph = sum(m.interventions for m in candidate_metrics.values()) / c_hours
    reduction = (b_iph - c_iph) / b_iph if b_iph > 0 else (0.0 if c_iph == 0 else -1.0)  # finite for JSON
    suite_ok = reduction > 0 and reduction >= tolerances.min_suite_iph_reduction_frac if b_iph > 0 else c_iph == 0
    reasons = [f"{name}: {check} failed" for name, v in classes.items() for check, ok in v.checks.items() if not ok]
    if not suite_ok:
        reasons.append(
            f"suite interventions/h fell {reduction:.1%}, need > 0 and >= {tolerances.min_suite_iph_reduction_frac:.0%}"
        )
    b_prog, c_prog = (_episode_mean(list(m.values()), "progress") for m in (baseline_metrics, candidate_metrics))
    progress_ok = c_prog >= b_prog * (1.0 - tolerances.suite_progress_tolerance_frac)
    if not progress_ok:
        reasons.append(f"suite progress fell {b_prog:.3f} -> {c_prog:.3f}, more than {tolerances.suite_progress_tolerance_frac:.0%}")
    result = GateResult(classes, b_iph, c_iph, reduction, suite_ok, progress_ok, reasons)
    logger.info("gate %s: iph %.2f -> %.2f; %s", "PASSED" if result.passed else "FAILED", b_iph, c_iph, reasons or "all checks ok")
    return result


# ---------------------------------------------------------------- running the held-out suite (adapter)

DEFAULT_SUITE: dict[str, tuple[str, ...]] = {
    "highway": ("highway",),
    "dense": ("dense",),
    "cut-in": ("cut-in",),
    "merge": ("merge",),
    "ccrs": ("ccrs-30", "ccrs-50", "ccrs-70"),
    "ccrm": ("ccrm-50", "ccrm-70"),
    "ccrb": ("ccrb-12-6", "ccrb-40-2"),
}


@dataclass(frozen=True)
class EvalSuite:
    """The held-out suite: per class, concrete scenarios each driven by ``vehicles_per_scenario`` vehicles
    for ``duration_s`` of simulated time, seeded from ``seed_base`` (>= HELDOUT_SEED_BASE)."""

    classes: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_SUITE))
    vehicles_per_scenario: int = 3
    duration_s: float = 30.0
    seed_base: int = HELDOUT_SEED_BASE

    def __post_init__(self) -> None:
        if not self.classes or any(not names for names in self.classes.values()):
            raise ConfigError("an evaluation suite needs at least one class, each with a scenario")
        unknown = set(self.classes) - set(SCENARIO_CLASSES)
        if unknown:
            raise ConfigError(f"unknown scenario classes {sorted(unknown)}; valid: {', '.join(SCENARIO_CLASSES)}")
        if self.vehicles_per_scenario < 1 or not self.duration_s > 0:
            raise ConfigError("suite vehicles_per_scenario must be >= 1 and duration_s > 0")
        if self.seed_base < HELDOUT_SEED_BASE:
            raise ConfigError(f"held-out seeds must start at >= {HELDOUT_SEED_BASE} (disjoint from training and fleet)")

    def seeds(self, cls: str) -> list[tuple[str, int]]:
        """(scenario, seed) per vehicle of class ``cls``; the same for every model evaluated."""
        offset = SCENARIO_CLASSES.index(cls) * 10_000
        return [
            (name, self.seed_base + offset + 100 * j + i)
            for j, name in enumerate(self.classes[cls])
            for i in range(self.vehicles_per_scenario)
        ]

    def to_dict(self) -> dict[str, object]:
        return {"classes": {k: list(v) for k, v in self.classes.items()}, "vehicles_per_scenario": self.vehicles_per_scenario,
                "duration_s": self.duration_s, "seed_base": self.seed_base}


@dataclass(frozen=True)
class SuiteRun:
    """Closed-loop metrics of several models on one suite, and where its episodes ran."""

    metrics: list[dict[str, ClassMetrics]]  # per model, in the order given
    execution: Execution
    placements: list[dict[str, object]]  # per unit: model index, class, scenario, vehicles, node


def suite_units(suite: EvalSuite) -> list[tuple[str, list[object]]]:
    """The suite cut into units of work: one per (class, concrete scenario), each a few vehicles.

    Vehicle ids and seeds are those of the whole class (``eval-<class>-<i>``), so a unit drives exactly
    the vehicles it would drive in one fleet of the whole class: each vehicle's result is its own.
    """
    from driveloop.edge.fleet import VehiclePlan

    units: list[tuple[str, list[object]]] = []
    for cls in suite.classes:
        plans = [VehiclePlan(f"eval-{cls}-{i}", name, seed) for i, (name, seed) in enumerate(suite.seeds(cls))]
        for name in suite.classes[cls]:
            units.append((cls, [p for p in plans if p.scenario == name]))
    return units


def _drive_unit(payloads: tuple[ModelPayload, ...], model: int, plans: list[object], duration_s: float) -> list[object]:
    """One unit, wherever it runs: the vehicles' closed-loop metrics with model ``model``.

    Replies are judged on simulated time (``InProcessInference(simulated_deadline=True)``): the suite
    judges how a model drives, not how busy the evaluating host is.
    """
    from driveloop.edge.fleet import run_fleet

    client = payloads[model].client("cpu", simulated_deadline=True)
    return run_fleet(plans, {"default": client}, duration_s=duration_s).vehicles  # type: ignore[arg-type]


def class_metrics(vehicles: list[object]) -> ClassMetrics:
    """A class's metrics from its vehicles' (in plan order): the same sums as one fleet's summary."""
    from driveloop.edge.fleet import FleetReport

    s = FleetReport(vehicles=vehicles, tick_ms=[], sim_ms=[], segments=[], faults={}, shadow={}).summary()  # type: ignore[arg-type]
    return ClassMetrics(
        episodes=max(1, int(sum(v.episodes for v in vehicles))),  # type: ignore[attr-defined]
        hours=float(s["driven_s"]) / 3600.0,  # type: ignore[arg-type]
        collisions=int(s["collisions"]),  # type: ignore[call-overload]
        interventions=int(s["interventions"]),  # type: ignore[call-overload]
        progress=float(s["progress"]),  # type: ignore[arg-type]
        jerk_mps3=float(s["mean_abs_jerk_mps3"]),  # type: ignore[arg-type]
    )


def evaluate_models(models: list[tuple[object, object]], suite: EvalSuite, executor: SimExecutor | None = None,
                    on_class: object = None) -> SuiteRun:
    """Drive ``suite`` in closed loop (full safety supervisor) with each (ONNX path, manifest); metrics per
    model and class. The units of every model go out together, so on Ray a baseline and a candidate
    share the cluster; in-process (no ``executor``, or the local backend) they run one after another.
    The same model on the same suite gives the same metrics on either backend and on any host.
    ``on_class(name)`` (optional) is called when a class is done for every model (progress displays).
    """
    executor = executor or SimExecutor()
    payloads = tuple(ModelPayload.read(path, manifest) for path, manifest in models)  # type: ignore[arg-type]
    units = suite_units(suite)
    work = [(m, plans, suite.duration_s) for m in range(len(models)) for _, plans in units]
    left = {cls: sum(1 for c, _ in units if c == cls) * len(models) for cls in suite.classes}

    def done(i: int) -> None:
        cls = units[i % len(units)][0]
        left[cls] -= 1
        if left[cls] == 0 and callable(on_class):
            on_class(cls)

    mapped = executor.map(_drive_unit, work, shared=(payloads,), on_result=done, what="evaluation episodes")
    out: list[dict[str, ClassMetrics]] = []
    for m in range(len(models)):
        per_class: dict[str, list[object]] = {cls: [] for cls in suite.classes}
        for (cls, _), vehicles in zip(units, mapped.results[m * len(units):(m + 1) * len(units)]):
            per_class[cls].extend(vehicles)
        out.append({cls: class_metrics(vs) for cls, vs in per_class.items()})
        for cls, metrics in out[-1].items():
            logger.info("eval %s v%s: %s", cls, getattr(models[m][1], "version", "?"), metrics.as_dict())
    placements = [{"model": m, "class": units[k][0], "scenario": units[k][1][0].scenario,  # type: ignore[attr-defined]
                   "vehicles": len(units[k][1]), "node": p.node}
                  for i, p in enumerate(mapped.placements) for m, k in [divmod(i, len(units))]]
    return SuiteRun(out, mapped.execution, placements)


def evaluate_model(onnx_path: object, manifest: object, suite: EvalSuite, on_class: object = None,
                   executor: SimExecutor | None = None) -> dict[str, ClassMetrics]:
    """Drive ``suite`` in closed loop with one ONNX model; metrics per class (see :func:`evaluate_models`)."""
    return evaluate_models([(onnx_path, manifest)], suite, executor, on_class).metrics[0]
