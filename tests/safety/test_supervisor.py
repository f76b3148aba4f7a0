"""Supervisor: arbitration, detection latency, hand-back hysteresis, logging and replay."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from driveloop.core.exceptions import SafetyError
from driveloop.safety import (
    Decision,
    ModelReply,
    Supervisor,
    SupervisorConfig,
    SupervisorInputs,
    SupervisorState,
    TrackData,
    step,
)

from ._harness import Case, blind_model, run

CFG = SupervisorConfig()
DT = 0.1
COMFORT = CFG.fallback.comfort_decel_mps2
FALL = CFG.limits.emergency_jerk_mps3 * DT  # most a hazard brake may deepen per tick
RISE = CFG.limits.max_jerk_mps3 * DT  # most any command may rise (or a non-hazard one fall) per tick
FULL = CFG.aeb.full_decel_mps2
GOOD = np.array([1.5, 0.02], np.float32)
CONF = np.array([0.9], np.float32)


def tick(i: int, reply: object = "good", track: object = None, enabled: bool = True, speed: float = 20.0,
         stamp_age: float = 0.0, accel: float = 0.0) -> SupervisorInputs:
    now = round(i * DT, 10)
    if reply == "good":
        reply = ModelReply(GOOD, CONF, now)
    return SupervisorInputs(now_s=now, ego_speed_mps=speed, ego_accel_mps2=accel, lane_offset_m=0.5,
                            heading_rel_rad=0.0, track=track, sensor_stamp_s=now - stamp_age,
                            reply=reply, model_enabled=enabled)  # type: ignore[arg-type]


def faulty(kind: str, i: int) -> dict[str, object]:
    now = round(i * DT, 10)
    return {
        "dead": {"reply": ModelReply(None, None, None, alive=False)},
        "deadline": {"reply": ModelReply(None, None, None)},
        "nan": {"reply": ModelReply(np.array([np.nan, 0.0], np.float32), CONF, now)},
        "range": {"reply": ModelReply(np.array([1e9, 0.0], np.float32), CONF, now)},
        "shape": {"reply": ModelReply(np.zeros(5, np.float32), CONF, now)},
        "stale": {"stamp_age": 0.5},
    }[kind]


def drive(sup: Supervisor, first: int, last: int, **kw: object) -> list[Decision]:
    return [sup.step(tick(i, **kw)) for i in range(first, last)]  # type: ignore[arg-type]


def test_valid_model_drives_within_limits() -> None:
    sup = Supervisor()
    decisions = drive(sup, 0, 10)
    assert all(d.source == "model" and not d.activation and d.watchdog is None for d in decisions)
    assert [round(d.accel_mps2, 6) for d in decisions[:4]] == [min(RISE * k, 1.5) for k in (1, 2, 3, 4)]  # ramp
    assert decisions[0].steering_rad == pytest.approx(0.02)
    assert decisions[0].reason is None and decisions[0].parts["dt_s"] == pytest.approx(DT)
    assert "ttc_s" not in decisions[0].parts  # no track, no AEB parts
    assert decisions[0].parts["aeb_decel_mps2"] == 0.0 and decisions[0].parts["fallback_s"] == 0.0


def test_model_braking_is_held_to_the_comfort_jerk() -> None:
    sup = Supervisor()
    drive(sup, 0, 5)  # +1.5 m/s^2
    hard = [sup.step(tick(i, reply=ModelReply(np.array([-8.0, 0.0], np.float32), CONF, round(i * DT, 10))))
            for i in range(5, 8)]
    assert [round(d.accel_mps2, 6) for d in hard] == pytest.approx([1.5 - RISE * k for k in (1, 2, 3)])
    assert all(d.source == "model" for d in hard)


def test_emergency_jerk_only_while_a_hazard_is_braking() -> None:
    # a hazard brakes by up to FALL per tick, anything else by RISE: start so high (the envelope widened
    # for the test) that one emergency tick ends a little above the comfort brake
    start = -COMFORT + FALL + 2 * RISE
    cfg = SupervisorConfig(limits=dataclasses.replace(CFG.limits, max_accel_mps2=max(start, CFG.limits.max_accel_mps2)))
    faulty_sup = Supervisor(cfg)  # a persistent fault keeps the emergency jerk after the activation tick
    got = [faulty_sup.step(tick(i, reply=None, accel=start)).accel_mps2 for i in range(2)]
    assert got == pytest.approx([start - FALL, -COMFORT])
    disabled = Supervisor(cfg)  # a disabled model is no emergency after the first tick
    got = [disabled.step(tick(i, enabled=False, accel=start)).accel_mps2 for i in range(3)]
    assert got == pytest.approx([start - FALL, start - FALL - RISE, -COMFORT])


def test_first_tick_ramps_from_the_measured_acceleration() -> None:
    assert Supervisor().step(tick(0, accel=1.2)).accel_mps2 == pytest.approx(1.5)
    assert Supervisor().step(tick(0, accel=-2.0)).accel_mps2 == pytest.approx(-1.5)


@pytest.mark.parametrize("kind", ["dead", "deadline", "nan", "range", "shape", "stale"])
def test_fault_detected_and_braking_on_the_same_tick(kind: str) -> None:
    sup = Supervisor()
    drive(sup, 0, 10)
    d = sup.step(tick(10, **faulty(kind, 10)))  # type: ignore[arg-type]
    assert d.watchdog == kind and d.source == "fallback" and d.activation
    assert d.reason is not None and d.reason.startswith(f"watchdog {kind}")
    assert d.accel_mps2 < 0.0  # the brake goes out on the detection tick (emergency jerk from +1.5)
    assert d.accel_mps2 == pytest.approx(max(1.5 - FALL, -COMFORT))
    later = sup.step(tick(11, **faulty(kind, 11)))  # type: ignore[arg-type]
    assert later.source == "fallback" and not later.activation and later.watchdog == kind
    assert later.accel_mps2 == pytest.approx(-COMFORT)
    assert later.steering_rad < 0.0  # holds the lane: 0.5 m left of centre steers right


def _first_model_tick(clear_tick: int, config: SupervisorConfig) -> int:
    """Hazard clear (and the model valid) from ``clear_tick``: the tick the model gets the car back."""
    return clear_tick + max(round(config.handback_hold_s / DT), config.handback_valid_ticks - 1)


def test_hand_back_needs_hold_time_and_valid_streak() -> None:
    sup = Supervisor()
    drive(sup, 0, 5)
    drive(sup, 5, 8, reply=None)  # three missed deadlines
    after = drive(sup, 8, 40)
    first_model = next(i for i, d in enumerate(after, start=8) if d.source == "model")
    assert first_model == _first_model_tick(8, CFG)
    assert all(d.reason == "hand-back pending" for d in after[: first_model - 8])
    handed = after[first_model - 8]
    assert handed.reason is None and handed.parts["fallback_s"] == 0.0 and not handed.activation
    assert after[first_model - 9].parts["fallback_s"] == pytest.approx((first_model - 1 - 5) * DT)
    assert after[0].watchdog is None and not after[0].activation


@pytest.mark.parametrize(("hold_s", "valid_ticks", "expected_tick"), [
    (0.0, 1, 8), (0.0, 3, 10), (0.5, 1, 13), (0.5, 8, 15), (1.0, 5, 18), (1.0, 15, 22), (2.0, 1, 28),
    # around the defaults: one tick of hold or one valid tick either side moves the hand-back
    *((h, v, _first_model_tick(8, SupervisorConfig(handback_hold_s=h, handback_valid_ticks=v)))
      for h in (CFG.handback_hold_s - DT, CFG.handback_hold_s, CFG.handback_hold_s + DT)
      for v in (CFG.handback_valid_ticks - 1, CFG.handback_valid_ticks, CFG.handback_valid_ticks + 1)),
])
def test_hand_back_sweep(hold_s: float, valid_ticks: int, expected_tick: int) -> None:
    sup = Supervisor(SupervisorConfig(handback_hold_s=hold_s, handback_valid_ticks=valid_ticks))
    drive(sup, 0, 5)
    drive(sup, 5, 8, reply=None)
    after = drive(sup, 8, 60)
    assert next(i for i, d in enumerate(after, start=8) if d.source == "model") == expected_tick


def test_a_fault_during_hand_back_restarts_the_hold() -> None:
    sup = Supervisor()
    drive(sup, 0, 5, reply=None)
    drive(sup, 5, 12)
    d = sup.step(tick(12, reply=None))
    assert d.source == "fallback" and not d.activation  # still in fallback: not a new activation
    after = drive(sup, 13, 40)
    assert next(i for i, d in enumerate(after, start=13) if d.source == "model") == 23


def test_hand_back_ramps_with_the_comfort_jerk() -> None:
    sup = Supervisor()
    drive(sup, 0, 5, reply=None)
    decisions = drive(sup, 5, 40)
    accels = [d.accel_mps2 for d in decisions]
    assert max(b - a for a, b in zip(accels, accels[1:])) <= 0.5 + 1e-9
    assert decisions[-1].source == "model" and decisions[-1].accel_mps2 == pytest.approx(1.5)


def test_model_disabled_means_fallback_from_the_first_tick() -> None:
    sup = Supervisor()
    decisions = drive(sup, 0, 30, enabled=False)
    assert decisions[0].activation and decisions[0].reason == "model disabled"
    assert all(d.source == "fallback" and d.watchdog is None for d in decisions)
    assert sum(d.activation for d in decisions) == 1
    assert decisions[-1].parts["fallback_s"] == pytest.approx(2.9)
    assert decisions[0].parts["valid_streak"] == 0.0


def test_aeb_takes_over_from_a_valid_model_and_hands_back_when_clear() -> None:
    sup = Supervisor()
    drive(sup, 0, 5)
    lead = TrackData(gap_m=20.0, closing_speed_mps=15.0, lead_speed_mps=5.0)
    d = sup.step(tick(5, track=lead))
    assert d.aeb and d.fcw and d.activation and d.source == "fallback" and d.watchdog is None
    assert d.reason == "aeb full: ttc=1.33 s, required decel 8.82 m/s^2"
    assert d.accel_mps2 == pytest.approx(max(1.5 - FALL, -FULL))  # emergency jerk towards full braking
    assert sup.step(tick(6, track=lead)).accel_mps2 == pytest.approx(-FULL)
    for key in ("ttc_s", "rss_safe_gap_m", "required_decel_mps2", "lead_decel_mps2", "gap_m"):
        assert key in d.parts
    assert d.parts["aeb_decel_mps2"] == pytest.approx(FULL)
    assert d.parts["ttc_s"] == pytest.approx(20.0 / 15.0) and d.parts["gap_m"] == 20.0
    assert d.parts["rss_safe_gap_m"] == pytest.approx(10.0 + 0.25 + 21.0**2 / 8.0 - 25.0 / 16.0)
    assert d.parts["required_decel_mps2"] == pytest.approx(225.0 / (2.0 * (18.0 - 5.25)))
    assert d.parts["lead_decel_mps2"] == 0.0
    after = drive(sup, 7, 40)  # the lead turned off: no track
    assert next(i for i, x in enumerate(after, start=7) if x.source == "model") == _first_model_tick(7, CFG)


def test_fcw_alone_warns_but_leaves_the_model_in_command() -> None:
    sup = Supervisor()
    # 20 m/s towards a stationary lead at 90 m: required decel 2.5 m/s^2 now, 3.3 a second from now
    d = sup.step(tick(0, track=TrackData(90.0, 20.0, 0.0)))
    assert d.fcw and not d.aeb and d.source == "model" and d.reason == "fcw"


def test_lead_history_restarts_on_a_new_object_and_when_lost() -> None:
    sup = Supervisor()
    for i in range(8):  # a lead 40 m ahead braking at 4 m/s^2, ego steady at 20 m/s
        lead_v = 20.0 - 4.0 * DT * i
        d = sup.step(tick(i, track=TrackData(40.0, 20.0 - lead_v, lead_v)))
    assert d.parts["lead_decel_mps2"] == pytest.approx(4.0)
    jumped = sup.step(tick(8, track=TrackData(15.0, 0.0, 20.0)))  # a cut-in: a different object
    assert jumped.parts["lead_decel_mps2"] == 0.0
    assert len(sup.state.lead_history) == 1
    sup.step(tick(9))
    assert sup.state.lead_history == ()


def test_history_keeps_the_window_and_follows_a_steady_gap() -> None:
    sup = Supervisor()
    for i in range(12):
        sup.step(tick(i, track=TrackData(40.0 - 0.5 * i, 5.0, 15.0)))
    assert len(sup.state.lead_history) == CFG.aeb.lead_decel_window_ticks
    assert sup.state.lead_history[-1] == (pytest.approx(1.1), 15.0)


def test_gap_jump_threshold_allows_closing_motion() -> None:
    cfg = SupervisorConfig(aeb=dataclasses.replace(CFG.aeb, track_jump_m=1.0))
    sup = Supervisor(cfg)
    sup.step(tick(0, track=TrackData(60.0, 20.0, 10.0)))
    sup.step(tick(1, track=TrackData(57.1, 20.0, 10.0)))  # moved 2.9 m <= 20 * 0.1 + 1.0
    assert len(sup.state.lead_history) == 2
    edge = Supervisor(cfg)
    edge.step(tick(0, track=TrackData(60.0, 20.0, 10.0)))
    edge.step(tick(1, track=TrackData(57.0, 20.0, 10.0)))  # moved exactly 3.0 m: still the same object
    assert len(edge.state.lead_history) == 2
    sup.step(tick(2, track=TrackData(54.0, 20.0, 10.0)))  # moved 3.1 m > 3.0
    assert len(sup.state.lead_history) == 1


@pytest.mark.parametrize("bad", [
    {"now_s": math.nan}, {"ego_speed_mps": math.inf}, {"ego_accel_mps2": "1"}, {"lane_offset_m": None},
    {"heading_rel_rad": True}, {"sensor_stamp_s": -math.inf},
    {"track": TrackData(math.nan, 0.0, 0.0)}, {"track": TrackData(10.0, math.inf, 0.0)},
    {"track": object()}, {"reply": "not a reply"},
])
def test_bad_inputs_raise_safety_error(bad: dict[str, object]) -> None:
    base = dict(now_s=0.0, ego_speed_mps=10.0, ego_accel_mps2=0.0, lane_offset_m=0.0, heading_rel_rad=0.0,
                track=None, sensor_stamp_s=0.0, reply=None)
    with pytest.raises(SafetyError):
        SupervisorInputs(**{**base, **bad})  # type: ignore[arg-type]


@pytest.mark.parametrize(("bad", "message"), [
    ({"now_s": math.nan}, "supervisor input now_s=nan must be a finite number"),
    ({"ego_speed_mps": "1"}, "supervisor input ego_speed_mps='1' must be a finite number"),
    ({"track": TrackData(10.0, math.inf, 0.0)}, "supervisor input track.closing_speed_mps=inf must be a finite number"),
    ({"track": object()}, "supervisor input track.gap_m=None must be a finite number"),
    ({"reply": "x"}, "supervisor input reply must be a ModelReply or None, got str"),
])
def test_bad_input_messages_are_exact(bad: dict[str, object], message: str) -> None:
    base = dict(now_s=0.0, ego_speed_mps=10.0, ego_accel_mps2=0.0, lane_offset_m=0.0, heading_rel_rad=0.0,
                track=None, sensor_stamp_s=0.0, reply=None)
    with pytest.raises(SafetyError) as info:
        SupervisorInputs(**{**base, **bad})  # type: ignore[arg-type]
    assert str(info.value) == message


def test_any_object_with_track_attributes_is_a_track() -> None:
    class EdgeTrack:
        gap_m = 10.0
        closing_speed_mps = 10.0
        lead_speed_mps = 0.0

    d = Supervisor().step(tick(0, track=EdgeTrack()))
    assert d.aeb and d.parts["gap_m"] == 10.0


@pytest.mark.parametrize("now", [0.3, 0.2])
def test_clock_must_advance(now: float) -> None:
    sup = Supervisor()
    sup.step(tick(3))
    with pytest.raises(SafetyError, match="clock"):
        sup.step(dataclasses.replace(tick(3), now_s=now, sensor_stamp_s=now))


def test_reset_forgets_everything() -> None:
    sup = Supervisor()
    drive(sup, 0, 5, reply=None)
    sup.reset()
    assert sup.state == SupervisorState()
    d = sup.step(tick(0))
    assert d.source == "model" and d.accel_mps2 == pytest.approx(0.5)


def test_step_is_pure() -> None:
    state = SupervisorState()
    inputs = tick(0, track=TrackData(30.0, 10.0, 10.0))
    assert step(state, inputs, CFG) == step(state, inputs, CFG)
    assert state == SupervisorState()


def test_activation_and_hand_back_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor()
    from driveloop.safety import supervisor as module

    with caplog.at_level(logging.INFO, logger=module.logger.name):
        drive(sup, 0, 3)
        drive(sup, 3, 5, reply=None)
        drive(sup, 5, 30)
    # INFO, not WARNING: an activation is routine driving (it is in the per-vehicle summary), not a fault.
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.INFO]
    assert [r.getMessage() for r in caplog.records] == [
        "fallback activation at t=0.300 s (ego 20.00 m/s): watchdog deadline: no reply by the deadline",
        "hand-back to the model at t=1.500 s after 1.20 s of fallback",
    ]


# Replay: record a drive's inputs to a file, replay them through a fresh supervisor, get the same decisions.
def _encode(value: object) -> object:
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}
    if dataclasses.is_dataclass(value):
        return {"type": type(value).__name__, **{f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    return value


def _decode(value: object) -> object:
    if isinstance(value, dict):
        if "ndarray" in value:
            return np.array(value["ndarray"], dtype=value["dtype"])
        kind = {"SupervisorInputs": SupervisorInputs, "ModelReply": ModelReply, "TrackData": TrackData}[value["type"]]
        return kind(**{k: _decode(v) for k, v in value.items() if k != "type"})
    return value


def test_replay_of_a_recorded_drive_reproduces_every_decision(tmp_path: Path) -> None:
    def flaky(now: float, ego: float, gap: float | None, lead: float | None) -> ModelReply:
        if 1.0 <= now < 1.35:
            return ModelReply(np.array([np.nan, 0.0], np.float32), CONF, now)
        return blind_model(now, ego, gap, lead)

    case = Case("ccrm-60-replay", 60 / 3.6, 20 / 3.6, 50.0, duration_s=12.0)
    recorded = run(case, flaky, noise_sigma=0.5, seed=7, keep=True)
    assert not recorded.collision and any(d.aeb for d in recorded.decisions)
    assert any(d.watchdog == "nan" for d in recorded.decisions)
    path = tmp_path / "drive.jsonl"
    path.write_text("\n".join(json.dumps(_encode(i)) for i in recorded.inputs))

    replayed_inputs = [_decode(json.loads(line)) for line in path.read_text().splitlines()]
    state, replayed = SupervisorState(), []
    for inputs in replayed_inputs:
        state, decision = step(state, inputs, CFG)  # type: ignore[arg-type]
        replayed.append(decision)
    assert replayed == recorded.decisions


def test_partial_stage_reason_and_exact_fault_reason() -> None:
    sup = Supervisor()
    d = sup.step(tick(0, track=TrackData(60.0, 20.0, 0.0)))  # required 400 / (2 * 51) = 3.92 m/s^2
    assert d.reason == "aeb partial: ttc=3.00 s, required decel 3.92 m/s^2"
    assert d.parts["aeb_decel_mps2"] == pytest.approx(CFG.aeb.brake_gain * 400.0 / 102.0)
    nan = sup.step(tick(1, reply=ModelReply(np.array([np.nan, 0.0], np.float32), CONF, 0.1)))
    assert nan.reason == "watchdog nan: non-finite model output"


def test_public_api_is_lazy_and_complete() -> None:
    import driveloop.safety as api
    from driveloop.safety import config, supervisor, types

    assert api.__all__ == sorted(api.__all__)
    homes = {"SupervisorConfig": config, "AebConfig": config, "WatchdogConfig": config, "LimitsConfig": config,
             "FallbackConfig": config, "LaneConfig": config, "Supervisor": supervisor, "SupervisorState": supervisor, "step": supervisor,
             "SupervisorInputs": types, "ModelReply": types, "Decision": types, "Track": types, "TrackData": types,
             "SideTrack": types, "FAULT_KINDS": types, "AdvisoryConfig": config, "Advisory": types}
    assert sorted(homes) == api.__all__
    for name, home in homes.items():
        assert api.__getattr__(name) is getattr(home, name)  # the lazy loader itself, not a cached global
        assert getattr(api, name) is getattr(home, name)
    assert api.FAULT_KINDS == ("dead", "deadline", "stale", "shape", "nan", "range")
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        api.Nope  # noqa: B018


def test_lazy_loader_imports_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import driveloop.safety as api
    from driveloop.safety import supervisor

    monkeypatch.delitem(api.__dict__, "Supervisor", raising=False)  # as if never imported
    assert api.__getattr__("Supervisor") is supervisor.Supervisor
    assert api.__dict__["Supervisor"] is supervisor.Supervisor  # cached for the next access


def test_aeb_partial_leaves_a_model_that_brakes_enough_in_command() -> None:
    lead = TrackData(60.0, 20.0, 0.0)  # partial stage: required 3.92 m/s^2, yields at <= -5.88
    hard = Supervisor()
    d = hard.step(tick(0, reply=ModelReply(np.array([-6.0, 0.0], np.float32), CONF, 0.0), track=lead, accel=-6.0))
    assert d.source == "model" and not d.aeb and not d.activation and d.fcw
    assert d.accel_mps2 == pytest.approx(-6.0) and d.parts["aeb_decel_mps2"] == 0.0
    assert not hard.state.aeb_braking
    soft = Supervisor()
    d = soft.step(tick(0, reply=ModelReply(np.array([-5.0, 0.0], np.float32), CONF, 0.0), track=lead, accel=-5.0))
    assert d.source == "fallback" and d.aeb and d.activation
    dead = Supervisor()  # a faulty reply never counts as braking
    d = dead.step(tick(0, reply=ModelReply(np.array([-6.0, 0.0], np.float32), CONF, 0.0, alive=False), track=lead))
    assert d.aeb and d.watchdog == "dead"
    off = Supervisor()  # nor does a disabled model's
    d = off.step(tick(0, reply=ModelReply(np.array([-6.0, 0.0], np.float32), CONF, 0.0), track=lead, enabled=False))
    assert d.aeb and d.reason == "model disabled"


def test_aeb_hysteresis_holds_in_the_supervisor() -> None:
    """Once braking, AEB holds while the required deceleration stays above the release level."""
    sup = Supervisor()
    first = sup.step(tick(0, track=TrackData(60.0, 20.0, 0.0)))  # partial: required 3.92 m/s^2
    assert first.aeb
    # required 400 / (2 * (93 - 2 - 7)) = 2.38 m/s^2: below the trigger, above release; TTC 4.65 s
    held = sup.step(tick(1, track=TrackData(60.0 + 33.0, 20.0, 0.0)))
    assert held.aeb and held.parts["aeb_decel_mps2"] == pytest.approx(
        max(CFG.aeb.partial_decel_mps2, CFG.aeb.brake_gain * 400.0 / 168.0))
    fresh = Supervisor().step(tick(0, track=TrackData(93.0, 20.0, 0.0)))
    assert not fresh.aeb


def test_hand_back_at_exactly_the_hold_time() -> None:
    from driveloop.safety.supervisor import TIME_TOLERANCE_S

    cfg = SupervisorConfig(handback_hold_s=1.0, handback_valid_ticks=1)
    sup = Supervisor(cfg)
    sup.step(dataclasses.replace(tick(0, reply=None), now_s=-0.1, sensor_stamp_s=-0.1))
    assert sup.step(tick(0)).source == "fallback"  # hazard clear from t = 0
    at = cfg.handback_hold_s - TIME_TOLERANCE_S
    before = dataclasses.replace(tick(0), now_s=at - 1e-6, sensor_stamp_s=at - 1e-6,
                                 reply=ModelReply(GOOD, CONF, at - 1e-6))
    assert sup.step(before).source == "fallback"
    exact = dataclasses.replace(tick(0), now_s=at, sensor_stamp_s=at, reply=ModelReply(GOOD, CONF, at))
    assert sup.step(exact).source == "model"
