"""The gate of an adaptation (``GateTolerances.improve_classes``): the targeted class must fall, every other
class is judged too and may not rise; without targets no class may rise and the suite must fall."""

from __future__ import annotations

import dataclasses

import pytest

from driveloop.cloud.evaluation import ClassMetrics, GateTolerances, gate, judge_class
from driveloop.core.exceptions import ConfigError

BASE = ClassMetrics(episodes=4, hours=0.1, collisions=0, interventions=10, progress=1.0, jerk_mps3=1.0)
TARGETED = GateTolerances(improve_classes=("fog",))


def _c(**changes: object) -> ClassMetrics:
    return dataclasses.replace(BASE, **changes)


# name, class, candidate interventions (baseline 10), tolerances, failing checks
CASES = [
    ("target falls", "fog", 9, TARGETED, set()),
    ("target stays", "fog", 10, TARGETED, {"interventions_fall"}),
    ("old class stays", "ccrs", 10, TARGETED, set()),
    ("old class falls", "ccrs", 3, TARGETED, set()),
    ("old class rises by one", "ccrs", 11, TARGETED, {"interventions_kept"}),
    ("untargeted gate: a class that stays is kept", "ccrs", 10, GateTolerances(), set()),
    ("untargeted gate: a class that rises fails", "ccrs", 11, GateTolerances(), {"interventions_kept"}),
]


@pytest.mark.parametrize(("name", "cls", "n", "tol", "failing"), CASES, ids=[c[0] for c in CASES])
def test_targeted_checks(name: str, cls: str, n: int, tol: GateTolerances, failing: set[str]) -> None:
    verdict = judge_class(cls, BASE, _c(interventions=n), tol)
    assert {k for k, ok in verdict.checks.items() if not ok} == failing
    assert len(verdict.checks) == 4


def test_adaptation_passes_with_old_classes_kept_and_fails_on_one_regression() -> None:
    base = {"fog": BASE, "ccrs": BASE, "dense": _c(interventions=0)}
    ok = gate(base, {"fog": _c(interventions=4), "ccrs": BASE, "dense": _c(interventions=0)}, TARGETED)
    assert ok.passed and ok.reasons == []
    worse = gate(base, {"fog": _c(interventions=4), "ccrs": BASE, "dense": _c(interventions=1)}, TARGETED)
    assert not worse.passed and worse.reasons == ["dense: interventions_kept failed"]
    # untargeted, the same candidate passes (nothing worse, the suite fell); one that only holds does not
    assert gate(base, {"fog": _c(interventions=4), "ccrs": BASE, "dense": _c(interventions=0)}, GateTolerances()).passed
    assert not gate(base, dict(base), GateTolerances()).passed


@pytest.mark.parametrize("bad", [(), ("rain",), (3,)])
def test_improve_classes_must_name_known_classes(bad: tuple) -> None:
    with pytest.raises(ConfigError, match="improve_classes"):
        GateTolerances(improve_classes=bad)
