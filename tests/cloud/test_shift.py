"""The shift detector: exact rates from (time, class, kind) events; a class above its baseline raises exactly one
alert (and one campaign), below it none; the operator's approval policy decides whether the campaign is approved;
the campaign goes through the real ingest service (SQLite catalog) and, on a vehicle, fires only in its
environment."""

from __future__ import annotations

import math

import pytest

from driveloop.cloud.shift import (
    ApprovalPolicy,
    Baseline,
    ClassEvent,
    ShiftPolicy,
    campaign_for,
    class_rates,
    detect_shifts,
    open_campaign,
    threshold_per_hour,
)
from driveloop.core.exceptions import ConfigError

POLICY = ShiftPolicy(min_exposure_h=0.02, min_interventions=3, rise_factor=2.0, rise_abs_per_h=20.0)
HOUR = 3600.0


def _events(cls: str, hours: float, interventions: int, t_s: float = 0.0) -> list[ClassEvent]:
    return [ClassEvent(t_s, cls, "exposure", hours * HOUR), *(ClassEvent(t_s, cls, "intervention") for _ in range(interventions))]


def test_class_rates_sum_exactly_within_the_window() -> None:
    events = [*_events("dense", 0.5, 5, t_s=10.0), *_events("dense", 0.5, 1, t_s=20.0), ClassEvent(20.0, "fog", "collision"),
              *_events("fog", 0.1, 4, t_s=30.0)]
    rates = class_rates(events)
    assert rates["dense"].exposure_h == pytest.approx(1.0) and rates["dense"].per_hour == pytest.approx(6.0)
    assert rates["fog"].collisions == 1 and rates["fog"].per_hour == pytest.approx(40.0)
    late = class_rates(events, since_s=15.0, until_s=30.0)
    assert set(late) == {"dense", "fog"} and late["dense"].interventions == 1 and late["fog"].exposure_h == 0
    assert late["fog"].per_hour == 0.0  # no exposure: no rate (never a division by zero)


def test_baseline_uses_the_fleet_rate_for_a_class_never_driven() -> None:
    base = Baseline.from_rates(class_rates([*_events("highway", 1.0, 2), *_events("dense", 1.0, 6)]))
    assert base.for_class("dense") == pytest.approx(6.0)
    assert base.for_class("fog") == pytest.approx(4.0)  # (2 + 6) / 2 h


# (name, baseline events, shifted events, alerts expected): each fixture built for one answer.
CASES = [
    ("new class above the fleet's rate", _events("dense", 1.0, 4), _events("fog", 0.05, 4), ["fog"]),  # 80/h > 24/h
    ("new class just below the threshold", _events("dense", 1.0, 4), _events("fog", 0.125, 3), []),  # 24/h, not >
    ("too little driving to judge", _events("dense", 1.0, 0), _events("fog", 0.01, 5), []),
    ("too few interventions to judge", _events("dense", 1.0, 0), _events("fog", 0.05, 2), []),
    ("old class rises above its own baseline", _events("cut-in", 1.0, 30), _events("cut-in", 0.1, 7), ["cut-in"]),  # 70 > 60
    ("old class at twice its baseline is not a rise", _events("cut-in", 1.0, 30), _events("cut-in", 0.1, 6), []),
]


@pytest.mark.parametrize(("name", "before", "after", "expected"), CASES, ids=[c[0] for c in CASES])
def test_detect_shifts(name: str, before: list[ClassEvent], after: list[ClassEvent], expected: list[str]) -> None:
    baseline = Baseline.from_rates(class_rates(before))
    alerts = detect_shifts(class_rates(after), baseline, POLICY)
    assert [a.scenario_class for a in alerts] == expected
    for a in alerts:
        assert a.per_hour > a.threshold_per_hour == threshold_per_hour(baseline.for_class(a.scenario_class), POLICY)


def test_a_class_with_an_open_campaign_raises_no_second_alert() -> None:
    baseline = Baseline.from_rates(class_rates(_events("dense", 1.0, 4)))
    rates = class_rates(_events("fog", 0.05, 10))
    assert len(detect_shifts(rates, baseline, POLICY)) == 1
    assert detect_shifts(rates, baseline, POLICY, open_classes={"fog"}) == []


def test_threshold_is_the_larger_of_factor_and_floor() -> None:
    assert threshold_per_hour(0.0, POLICY) == POLICY.rise_abs_per_h
    assert threshold_per_hour(100.0, POLICY) == 200.0
    assert threshold_per_hour(10.0, POLICY) == 30.0


@pytest.mark.parametrize("bad", [dict(kind="crash"), dict(t_s=math.nan), dict(value=-1.0), dict(scenario_class="")])
def test_malformed_events_are_refused(bad: dict) -> None:
    with pytest.raises(ConfigError):
        ClassEvent(**{"t_s": 0.0, "scenario_class": "fog", "kind": "exposure", **bad})


def test_campaign_targets_the_environment_and_compiles_on_the_vehicle() -> None:
    from driveloop.cloud.campaigns import new_campaign, to_trigger_spec
    from driveloop.edge.triggers import TriggerEngine

    alert = detect_shifts(class_rates(_events("fog", 0.05, 10)), Baseline({}, 0.0), POLICY)[0]
    spec = campaign_for(alert, POLICY, now_s=1000.0)
    assert spec.name == "shift-fog" and spec.priority == POLICY.campaign_priority
    assert spec.condition.startswith("env_fog and (") and spec.expires_at_s == 1000.0 + POLICY.campaign_ttl_s
    trigger = to_trigger_spec(new_campaign(spec, now_s=1000.0))
    engine = TriggerEngine([trigger])
    base = {"t": 1.0, "speed": 20.0, "accel": -3.0, "steering": 0.0, "confidence": 0.9, "latency_ms": 1.0,
            "ttc": 1.5, "fallback": True, "activation": True, "fcw": True, "aeb": True, "watchdog": False,
            "model_valid": True, "collision": False}
    from driveloop.sim.scenarios import environment_signals

    assert engine.evaluate({**base, **environment_signals("highway")}, 1.0) == []
    fired = engine.evaluate({**base, **environment_signals("fog-40")}, 2.0)
    assert [e.trigger for e in fired] == ["campaign.shift-fog"]


def test_old_class_campaign_collects_everywhere_it_applies() -> None:
    alert = detect_shifts(class_rates(_events("cut-in", 0.1, 20)), Baseline({"cut-in": 1.0}, 1.0), POLICY)[0]
    assert campaign_for(alert, POLICY, now_s=0.0).condition == POLICY.condition


APPROVALS = [
    ("any class", "*", "fog", 9, True),
    ("named class", "fog,aggressive", "fog", 9, True),
    ("class not named", "aggressive", "fog", 9, False),
    ("empty policy approves nothing", "", "fog", 9, False),
]


@pytest.mark.parametrize(("name", "text", "cls", "priority", "ok"), APPROVALS, ids=[a[0] for a in APPROVALS])
def test_approval_policy(name: str, text: str, cls: str, priority: int, ok: bool) -> None:
    spec = campaign_for(detect_shifts(class_rates(_events(cls, 0.05, 10)), Baseline({}, 0.0), POLICY)[0], POLICY, 0.0)
    assert ApprovalPolicy.parse(text).decide(cls, spec)[0] is ok


def test_approval_policy_caps_priority_and_refuses_unknown_classes() -> None:
    spec = campaign_for(detect_shifts(class_rates(_events("fog", 0.05, 10)), Baseline({}, 0.0), POLICY)[0], POLICY, 0.0)
    ok, why = ApprovalPolicy.parse("*", max_priority=5).decide("fog", spec)
    assert not ok and "priority 9" in why
    with pytest.raises(ConfigError, match="unknown scenario classes"):
        ApprovalPolicy.parse("fog,rain")


@pytest.fixture()
def ingest(tmp_path):
    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.ingest_service import IngestConfig, IngestService
    from driveloop.cloud.store import ObjectStore

    service = IngestService(ObjectStore(str(tmp_path / "store")), Catalog(f"sqlite:///{tmp_path / 'catalog.db'}"),
                            IngestConfig(staging_dir=tmp_path / "uploads"))
    yield service
    service.catalog.close()


def test_open_campaign_goes_through_the_campaign_path_and_is_auto_approved(ingest) -> None:
    alert = detect_shifts(class_rates(_events("slippery", 0.05, 10)), Baseline({}, 0.0), POLICY)[0]
    out = open_campaign(ingest, alert, POLICY, ApprovalPolicy.parse("*"))
    assert out["approved"] and out["state"] == "approved" and out["name"] == "shift-slippery"
    (stored,) = ingest.catalog.campaigns()
    assert stored.id == out["id"] and stored.state == "approved"
    assert [c["id"] for c in ingest.vehicle_campaigns()] == [out["id"]]  # vehicles receive it


def test_policy_that_says_no_leaves_the_campaign_waiting_for_a_person(ingest) -> None:
    alert = detect_shifts(class_rates(_events("slippery", 0.05, 10)), Baseline({}, 0.0), POLICY)[0]
    out = open_campaign(ingest, alert, POLICY, ApprovalPolicy.parse("fog"))
    assert not out["approved"] and out["state"] == "created"
    assert ingest.vehicle_campaigns() == []  # nothing reaches a vehicle unapproved
    assert len(ingest.catalog.campaigns()) == 1


def test_a_second_alert_for_the_same_shift_reuses_its_campaign(ingest) -> None:
    """One campaign per shift even across a restart (the detector's memory is gone, the catalog's is not)."""
    alert = detect_shifts(class_rates(_events("slippery", 0.05, 10)), Baseline({}, 0.0), POLICY)[0]
    first = open_campaign(ingest, alert, POLICY, ApprovalPolicy.parse(""))
    again = open_campaign(ingest, alert, POLICY, ApprovalPolicy.parse("slippery"))
    assert again["id"] == first["id"] and again["approved"] and not first["approved"]
    assert len(ingest.catalog.campaigns()) == 1
