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


# -- the live path: stream messages -> events -> a reference period, then a sliding window -------------------


def _tel(scenario: str, wall: float, vid: str = "v1", seq: int = 0):
    from driveloop.contracts.stream import Telemetry

    return Telemetry(vehicle_id=vid, seq=seq, t_s=0.0, wall_ts=wall, x_m=0.0, y_m=0.0, lane=1, speed_mps=20.0,
                     accel_mps2=0.0, mode="model", scenario=scenario)


def _evt(kind: str, scenario: str, wall: float):
    from driveloop.contracts.stream import VehicleEvent

    return VehicleEvent(vehicle_id="v1", seq=0, t_s=0.0, wall_ts=wall, x_m=0.0, y_m=0.0, lane=1, speed_mps=20.0,
                        kind=kind, scenario=scenario)


def test_stream_messages_become_the_detectors_events() -> None:
    from driveloop.cloud.shift import stream_class_events
    from driveloop.contracts.stream import TELEMETRY_PERIOD_S

    got = stream_class_events([_tel("fog", 5.0), _evt("intervention", "fog", 6.0), _evt("collision", "dense", 7.0),
                               _evt("aeb", "fog", 8.0), _evt("sensor_degraded", "fog", 9.0)])
    assert got == [ClassEvent(5.0, "fog", "exposure", TELEMETRY_PERIOD_S), ClassEvent(6.0, "fog", "intervention"),
                   ClassEvent(7.0, "dense", "collision")]  # other kinds are not interventions: the report's rule


def test_live_shift_takes_its_baseline_from_the_reference_period_then_slides() -> None:
    from driveloop.cloud.shift import LiveShift

    live = LiveShift(window_s=600.0, reference_s=100.0, bucket_s=10.0)
    now = 10_000.0
    live.add([ClassEvent(now - 500, "dense", "exposure", 90.0), ClassEvent(now - 450, "dense", "intervention")], now)
    assert live.freeze() is None and live.alerts(POLICY) == []  # the reference period has not ended
    live.add([ClassEvent(now - 300, "fog", "exposure", 36.0),
              *(ClassEvent(now - 300, "fog", "intervention") for _ in range(4))], now)
    base = live.freeze()
    assert base is not None and base.for_class("dense") == pytest.approx(40.0) and base.for_class("fog") == 40.0
    assert live.freeze() is None  # taken once
    live.add([ClassEvent(now - 460, "dense", "exposure", 90.0)], now)  # a straggler of the reference period
    again = live.freeze()
    assert again is not None and again.for_class("dense") == pytest.approx(20.0)
    assert set(live.rates()) == {"fog"} and live.rates()["fog"].per_hour == pytest.approx(400.0)
    assert [a.scenario_class for a in live.alerts(POLICY)] == []  # 36 s of fog: under min_exposure_h (72 s)
    live.add([ClassEvent(now - 200, "fog", "exposure", 36.0)], now)
    assert [a.scenario_class for a in live.alerts(POLICY)] == ["fog"]  # 200/h > max(2 x 20, 20 + 20)
    assert live.alerts(POLICY, open_classes={"fog"}) == []
    live.add([ClassEvent(now + 5_000, "dense", "exposure", 36.0), ClassEvent(now - 601, "fog", "intervention")],
             now + 450)  # a clock ahead counts at now; an event older than the window is stale
    assert live.stale == 1 and live.latest_s == now + 450
    assert set(live.rates()) == {"dense"}  # fog's minutes slid out of the window


def test_a_stored_baseline_is_checked_when_read_back() -> None:
    base = Baseline({"dense": 4.0}, 3.0)
    assert Baseline.from_dict(base.as_dict()) == base
    for bad in (None, {"per_class": {}}, {"per_class": [1], "fleet": 1.0}, {"per_class": {"a": "x"}, "fleet": 1},
                {"per_class": {"a": float("nan")}, "fleet": 1.0}, {"per_class": {}, "fleet": -1.0}):
        with pytest.raises(ConfigError):
            Baseline.from_dict(bad)
