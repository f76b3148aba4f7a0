"""Collection campaigns: spec validation table, lifecycle, expiry/priority, wire format, and the
campaign → recorder trigger conversion applied by the real TriggerEngine."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from driveloop.cloud.campaigns import (
    Campaign,
    CampaignSpec,
    active_campaigns,
    approve,
    from_wire,
    new_campaign,
    spec_from_json,
    to_trigger_spec,
    to_wire,
    trigger_specs,
)
from driveloop.edge.transport import campaign_triggers
from driveloop.edge.triggers import TriggerEngine
from driveloop.core.exceptions import ConfigError

NOW = 1_800_000_000.0


def _signals(**over: float | bool) -> dict[str, float | bool]:
    base: dict[str, float | bool] = {
        "t": 0.0, "speed": 20.0, "accel": 0.0, "steering": 0.0, "confidence": 0.9, "latency_ms": 2.0,
        "ttc": math.inf, "fallback": False, "activation": False, "fcw": False, "aeb": False,
        "watchdog": False, "model_valid": True, "collision": False,
    }  # fmt: skip
    base.update(over)
    return base


GOOD = [
    ("minimal", {"name": "x", "condition": "fallback"}),
    ("full", {"name": "low-ttc_2", "condition": "ttc < 1.5 or fallback", "trigger_mode": "always",
              "min_interval_s": 0, "pre_window_s": 60, "post_window_s": 0.5, "priority": 9,
              "expires_at_s": NOW + 10}),
    ("functions", {"name": "swerve", "condition": "abs(steering) > 0.2 and min(speed, 30) > 10"}),
]
BAD = [
    ("syntax", {"name": "x", "condition": "ttc <"}, "not a valid expression"),
    ("code", {"name": "x", "condition": "__import__('os').system('x')"}, ""),
    ("attribute", {"name": "x", "condition": "ttc.real > 1"}, ""),
    ("unknown-signal", {"name": "x", "condition": "speeed > 3"}, "unknown signals"),
    ("empty-condition", {"name": "x", "condition": "  "}, "non-empty"),
    ("long-condition", {"name": "x", "condition": " or ".join(["fallback"] * 80)}, ""),
    ("bad-name", {"name": "Has Space", "condition": "fallback"}, "name"),
    ("long-name", {"name": "a" * 55, "condition": "fallback"}, "name"),
    ("mode", {"name": "x", "condition": "fallback", "trigger_mode": "sometimes"}, "trigger_mode"),
    ("negative-interval", {"name": "x", "condition": "fallback", "min_interval_s": -1}, "min_interval_s"),
    ("nan-window", {"name": "x", "condition": "fallback", "pre_window_s": float("nan")}, "pre_window_s"),
    ("huge-window", {"name": "x", "condition": "fallback", "post_window_s": 61}, "post_window_s"),
    ("string-number", {"name": "x", "condition": "fallback", "min_interval_s": "5"}, "number"),
    ("priority-zero", {"name": "x", "condition": "fallback", "priority": 0}, "priority"),
    ("priority-bool", {"name": "x", "condition": "fallback", "priority": True}, "priority"),
    ("priority-ten", {"name": "x", "condition": "fallback", "priority": 10}, "priority"),
    ("expiry-inf", {"name": "x", "condition": "fallback", "expires_at_s": float("inf")}, "expires_at_s"),
    ("unknown-field", {"name": "x", "condition": "fallback", "color": "red"}, "unknown campaign fields"),
    ("missing-condition", {"name": "x"}, "missing"),
]


@pytest.mark.parametrize("payload", [c[1] for c in GOOD], ids=[c[0] for c in GOOD])
def test_good_specs(payload: dict[str, object]) -> None:
    spec = spec_from_json(payload)
    assert spec.name == payload["name"] and spec.condition == payload["condition"]


@pytest.mark.parametrize("payload,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_specs_are_config_errors(payload: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match or None):
        spec_from_json(payload)


def test_spec_from_json_needs_an_object() -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        spec_from_json(["name", "x"])


def test_lifecycle_created_approved_expired() -> None:
    spec = CampaignSpec("low-ttc", "ttc < 1.5", expires_at_s=NOW + 100)
    c = new_campaign(spec, NOW)
    assert c.state == "created" and not c.is_active(NOW)
    a = approve(c, NOW + 1)
    assert a.state == "approved" and a.approved_at_s == NOW + 1
    assert a.is_active(NOW + 99.9) and not a.is_active(NOW + 100)
    with pytest.raises(ConfigError, match="already approved"):
        approve(a, NOW + 2)
    with pytest.raises(ConfigError, match="expired"):
        approve(c, NOW + 100)
    with pytest.raises(ConfigError, match="expires before"):
        new_campaign(spec, NOW + 100)
    with pytest.raises(ConfigError, match="approved_at_s"):
        replace(a, approved_at_s=None)
    with pytest.raises(ConfigError, match="id"):
        replace(a, id="x")
    assert approve(new_campaign(CampaignSpec("forever", "fallback"), NOW), NOW).is_active(NOW + 1e9)


def test_active_campaigns_order_and_filter() -> None:
    def make(name: str, priority: int, created: float, approved: bool = True, expires: float | None = None) -> Campaign:
        c = new_campaign(CampaignSpec(name, "fallback", priority=priority, expires_at_s=expires), created)
        return approve(c, created) if approved else c

    cs = [make("low", 1, NOW), make("high-new", 8, NOW + 2), make("high-old", 8, NOW + 1),
          make("draft", 9, NOW, approved=False), make("old", 9, NOW, expires=NOW + 5)]
    assert [c.spec.name for c in active_campaigns(cs, NOW + 3)] == ["old", "high-old", "high-new", "low"]
    assert [c.spec.name for c in active_campaigns(cs, NOW + 5)] == ["high-old", "high-new", "low"]
    assert [t.name for t in trigger_specs(cs, NOW + 5)] == ["campaign.high-old", "campaign.high-new", "campaign.low"]


def test_wire_round_trip_and_tampering() -> None:
    c = approve(new_campaign(CampaignSpec("cut-in", "abs(steering) > 0.1", priority=4), NOW), NOW + 1)
    wire = to_wire(c)
    assert from_wire(wire) == c
    assert wire["trigger"]["name"] == "campaign.cut-in"
    with pytest.raises(ConfigError):
        from_wire({**wire, "condition": "open('x')"})
    with pytest.raises(ConfigError, match="missing"):
        from_wire({k: v for k, v in wire.items() if k != "state"})
    with pytest.raises(ConfigError):
        from_wire({**wire, "created_at_s": "yesterday"})
    with pytest.raises(ConfigError):
        campaign_triggers([{**wire, "trigger": {**wire["trigger"], "condition": "1 +"}}])
    with pytest.raises(ConfigError, match="unexpected fields"):
        campaign_triggers([{**wire, "trigger": {**wire["trigger"], "evil": True}}])
    with pytest.raises(ConfigError, match="without a trigger"):
        campaign_triggers([{"id": c.id}])


def test_campaign_becomes_a_recorder_trigger_that_fires_as_specified() -> None:
    """``ttc < 1.5 or fallback``, rising edge, 2 s minimum interval, through the vehicle's engine."""
    spec = CampaignSpec("near-miss", "ttc < 1.5 or fallback", trigger_mode="rising_edge",
                        min_interval_s=2.0, pre_window_s=4.0, post_window_s=3.0, priority=7,
                        expires_at_s=NOW + 60)
    c = approve(new_campaign(spec, NOW), NOW)
    (trigger,) = campaign_triggers([to_wire(c)])  # what the vehicle rebuilds from the wire
    assert trigger == to_trigger_spec(c)
    engine = TriggerEngine([trigger])
    ttcs = [5.0, 1.2, 1.0, 3.0, 1.1, 4.0, 4.0, 4.0, 1.4, 1.3]  # crossings at 1 (fires), 4 (<2 s), 8 (fires)
    fired = [t for t, ttc in enumerate(ttcs) if engine.evaluate(_signals(ttc=ttc), NOW + 0.5 * t)]
    assert fired == [1, 8]
    assert engine.evaluate(_signals(), NOW + 19) == []
    (ev,) = engine.evaluate(_signals(fallback=True), NOW + 20)  # the other branch of the condition
    assert (ev.trigger, ev.priority, ev.pre_s, ev.post_s) == ("campaign.near-miss", 7, 4.0, 3.0)
    assert engine.evaluate(_signals(fallback=False), NOW + 30) == []
    assert engine.evaluate(_signals(fallback=True), NOW + 60) == []  # expired on the vehicle too


def test_always_mode_fires_every_tick_subject_to_interval() -> None:
    c = approve(new_campaign(CampaignSpec("hard-brake", "accel < -4", trigger_mode="always",
                                          min_interval_s=0.25), NOW), NOW)
    engine = TriggerEngine(trigger_specs([c], NOW))
    fired = [t for t in range(6) if engine.evaluate(_signals(accel=-6.0), NOW + 0.1 * t)]
    assert fired == [0, 3]


def test_campaign_round_trip_cloud_to_recorder_to_catalog(tmp_path: Path) -> None:
    """Create + approve in the cloud → the vehicle fetches it → its recorder flags the moments →
    the uploader sends that event segment first → the catalog finds it by the campaign's event."""
    import numpy as np

    from driveloop.cloud.catalog import SegmentQuery
    from driveloop.edge.recorder import Recorder
    from driveloop.edge.spool import Spool
    from driveloop.cloud.local_transport import LocalTransport
    from driveloop.edge.triggers import builtin_triggers
    from driveloop.edge.uploader import Uploader
    from tests.fakes.transport import synthetic_tick

    local = LocalTransport.under(tmp_path / "cloud", "veh-a")
    created = local.service.create_campaign({"name": "fast", "condition": "speed > 30", "priority": 8,
                                             "min_interval_s": 0.0, "pre_window_s": 0.0, "post_window_s": 0.0})
    assert local.campaigns() == []  # not approved yet
    local.service.approve_campaign(created["id"])
    triggers = campaign_triggers(local.campaigns())
    assert [t.name for t in triggers] == ["campaign.fast"]

    spool = Spool(tmp_path / "spool", 10**9)
    rng = np.random.default_rng(0)
    with Recorder(spool, "veh-a", "highway", 0, "1", segment_max_s=2.0,
                  triggers=[*builtin_triggers(), *triggers]) as rec:
        for i in range(60):  # three 2 s segments; only the last one drives fast
            tick = synthetic_tick(i, rng)
            speed = 35.0 if i == 50 else 20.0
            rec.record(replace(tick, state={"speed_mps": speed, "crashed": False}))
    first = spool.closed_segments()[0]
    assert first.priority == 8  # the campaign's priority puts it first in the upload queue

    with Uploader(spool, local, tmp_path / "state") as up:
        report = up.drain(max_s=60)
    assert len(report.uploaded) == 3
    (hit,) = local.service.catalog.segments(SegmentQuery(event="campaign.fast"))
    assert hit.meta.events == {"campaign.fast": 1} and hit.meta.has_event and hit.sha256 == report.uploaded[0]
    local.close()
