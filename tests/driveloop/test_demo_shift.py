"""The demo's shift tracker over fleet reports: the baseline is the familiar world since the last rollout, the
campaign opens after the first shifted window whose new class rises (exactly once, through the real ingest
service), stages are stamped in order, and a resumed demo gets its tracker back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from driveloop._demo_shift import ShiftTracker, report_events, shift_report
from driveloop.cloud.shift import ApprovalPolicy


@dataclass
class _Vehicle:
    driven_s_by_kind: dict[str, float]
    interventions_by_kind: dict[str, int]
    collisions_by_kind: dict[str, int] = field(default_factory=dict)


@dataclass
class _Report:
    vehicles: list[_Vehicle]


def _report(per_class: dict[str, tuple[float, int]]) -> _Report:
    """One vehicle per class: (seconds driven, interventions)."""
    return _Report([_Vehicle({c: s}, {c: n} if n else {}) for c, (s, n) in per_class.items()])


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def ingest(tmp_path):
    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.ingest_service import IngestConfig, IngestService
    from driveloop.cloud.store import ObjectStore

    def make() -> Any:
        return IngestService(ObjectStore(str(tmp_path / "store")), Catalog(f"sqlite:///{tmp_path / 'catalog.db'}"),
                             IngestConfig(staging_dir=tmp_path / "uploads"))
    return make


def test_report_events_sum_vehicles_per_class() -> None:
    events = report_events(_Report([_Vehicle({"fog": 10.0}, {"fog": 2}), _Vehicle({"fog": 5.0, "dense": 3.0}, {})]), 7.0)
    got = {(e.scenario_class, e.kind): e.value for e in events}
    assert got == {("fog", "exposure"): 15.0, ("fog", "intervention"): 2.0, ("dense", "exposure"): 3.0}
    assert {e.t_s for e in events} == {7.0}


def test_tracker_detects_once_and_stamps_the_stages_in_order(ingest) -> None:
    clock = _Clock()
    t = ShiftTracker("fog", ingest, ApprovalPolicy.parse("fog"), clock=clock)
    t.observe(_report({"dense": (3600.0, 50)}), 0.0, 60.0, "old data drive")  # before the last rollout: not baseline
    t.reference_from_s = 60.0
    t.observe(_report({"dense": (3600.0, 2), "highway": (3600.0, 0)}), 60.0, 60.0, "rollout window 1")
    t.start_shift(120.0)
    assert t.baseline is not None and t.baseline.fleet_per_hour == pytest.approx(1.0)  # 2 in 2 h
    clock.t += 30
    t.observe(_report({"fog": (18.0, 1), "dense": (3600.0, 1)}), 120.0, 60.0, "data drive 1/2")  # 0.005 h: too little
    assert t.campaign is None
    clock.t += 30
    t.observe(_report({"fog": (36.0, 3)}), 180.0, 60.0, "data drive 2/2")  # 4 in 0.015 h = 267/h > 21/h
    assert t.campaign is not None and t.campaign["approved"] and t.stamps == {"detected": 60.0}
    t.observe(_report({"fog": (36.0, 9)}), 240.0, 60.0, "rollout window 1")  # still risen: no second campaign
    service = ingest()
    assert [c.id for c in service.catalog.campaigns()] == [t.campaign["id"]]
    service.catalog.close()
    clock.t += 100
    t.mark("validated")
    clock.t += 50
    t.mark("adapted")
    t.mark("validated")  # first time only
    assert t.stamps == {"detected": 60.0, "validated": 160.0, "adapted": 210.0}
    assert [w["world"] for w in t.windows] == ["familiar", "familiar", "shifted", "shifted", "shifted"]
    again = ShiftTracker("fog", ingest, ApprovalPolicy.parse("fog"), clock=clock)
    again.restore(t.to_state())
    assert (again.campaign, again.stamps, again.windows, again.events) == (t.campaign, t.stamps, t.windows, t.events)
    assert again.baseline == t.baseline and again.shifted


def test_a_policy_that_says_no_leaves_the_campaign_unapproved(ingest) -> None:
    t = ShiftTracker("fog", ingest, ApprovalPolicy.parse(""))
    t.start_shift(0.0)
    t.observe(_report({"fog": (72.0, 5)}), 0.0, 60.0, "data drive 1/1")
    assert t.campaign is not None and not t.campaign["approved"] and t.campaign["state"] == "created"


def test_shift_report_takes_before_from_the_shifted_iteration_and_after_from_the_next_drive() -> None:
    t = ShiftTracker("fog", lambda: None, ApprovalPolicy.parse("*"))
    t.start_shift(0.0)
    gate = {"classes": {"fog": {"passed": True}, "dense": {"passed": True}}}
    rows = [{"index": 1, "kind": "loop", "collisions": 0, "classes": {"dense": {"per_hour": 1.0}}},
            {"index": 2, "kind": "loop", "collisions": 0, "classes": {"fog": {"per_hour": 200.0}}, "candidate": 4,
             "pipeline": {"candidate": 4, "gate": gate}, "federated": {"candidate": 5, "gate": {}},
             "rollout_outcome": "completed"}]
    final = {"collisions": 0, "classes": {"fog": {"per_hour": 50.0}}}
    out = shift_report(t, rows, final, shift_after=1)
    assert (out["before_per_hour"], out["after_per_hour"], out["old_classes_ok"]) == (200.0, 50.0, True)
    gate["classes"]["dense"]["passed"] = False
    assert shift_report(t, rows, final, shift_after=1)["old_classes_ok"] is False
    assert shift_report(t, rows, {**final, "collisions": 1}, shift_after=1)["old_classes_ok"] is False
