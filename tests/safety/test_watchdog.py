"""Watchdog: every fault kind as a named case, every threshold swept from below to above.

The sweep points come from the config's constants, so a changed threshold moves its sweep.
"""

from __future__ import annotations

import numpy as np
import pytest

from driveloop.safety import ModelReply, WatchdogConfig
from driveloop.safety.watchdog import CLOCK_TOLERANCE_S, check_reply

CFG = WatchdogConfig()
PERIOD_S = 0.1
NOW = 10.0
F32 = np.float32


def reply(action: object = None, confidence: object = None, received: float | None = NOW, alive: bool = True) -> ModelReply:
    action = np.array([0.5, 0.01], F32) if action is None else action
    confidence = np.array([0.9], F32) if confidence is None else confidence
    return ModelReply(action, confidence, received, alive)


CASES = [
    ("valid", reply(), NOW, None),
    ("valid batch-shaped", reply(np.array([[0.5, 0.01]], F32), np.array([[0.9]], F32)), NOW, None),
    ("valid float64 and scalar confidence", reply(np.array([0.5, 0.01]), np.array(0.9)), NOW, None),
    ("valid float16", reply(np.array([0.5, 0.01], np.float16)), NOW, None),
    ("no reply at all", None, NOW, "deadline"),
    ("no reply by the deadline", reply(received=None), NOW, "deadline"),
    ("dead process", reply(alive=False), NOW, "dead"),
    ("dead beats late", ModelReply(None, None, None, alive=False), NOW, "dead"),
    ("late reply", reply(received=NOW - 0.15), NOW, "deadline"),
    ("reply from the future", reply(received=NOW + 0.01), NOW, "deadline"),
    ("late beats stale", reply(received=NOW - 0.5), NOW - 1.0, "deadline"),
    ("stale sensors", reply(), NOW - 0.5, "stale"),
    ("sensors from the future", reply(), NOW + 0.01, "stale"),
    ("stale beats garbage", reply("garbage"), NOW - 0.5, "stale"),
    ("action None", ModelReply(None, np.array([0.9], F32), NOW), NOW, "shape"),
    ("action string", reply("accelerate"), NOW, "shape"),
    ("action list", reply([0.5, 0.0]), NOW, "shape"),
    ("action nested list", reply([[0.5, 0.0]]), NOW, "shape"),
    ("action int array", reply(np.array([1, 0], np.int32)), NOW, "shape"),
    ("action bool array", reply(np.array([True, False])), NOW, "shape"),
    ("action object array", reply(np.array([0.5, "x"], dtype=object)), NOW, "shape"),
    ("action complex", reply(np.array([0.5, 0.0], np.complex64)), NOW, "shape"),
    ("action too long", reply(np.zeros(3, F32)), NOW, "shape"),
    ("action too short", reply(np.zeros(1, F32)), NOW, "shape"),
    ("action batch of two", reply(np.zeros((2, 2), F32)), NOW, "shape"),
    ("action scalar", reply(np.float32(0.5) * np.ones((), F32)), NOW, "shape"),
    ("action float", reply(0.5), NOW, "shape"),
    ("confidence None", ModelReply(np.array([0.5, 0.0], F32), None, NOW), NOW, "shape"),
    ("confidence two values", reply(confidence=np.array([0.5, 0.5], F32)), NOW, "shape"),
    ("confidence python float", reply(confidence=0.9), NOW, "shape"),
    ("confidence int array", reply(confidence=np.array([1])), NOW, "shape"),
    ("accel NaN", reply(np.array([np.nan, 0.0], F32)), NOW, "nan"),
    ("steer NaN", reply(np.array([0.0, np.nan], F32)), NOW, "nan"),
    ("accel +inf", reply(np.array([np.inf, 0.0], F32)), NOW, "nan"),
    ("steer -inf", reply(np.array([0.0, -np.inf], F32)), NOW, "nan"),
    ("confidence NaN", reply(confidence=np.array([np.nan], F32)), NOW, "nan"),
    ("confidence inf", reply(confidence=np.array([np.inf], F32)), NOW, "nan"),
    ("huge accel", reply(np.array([1e30, 0.0], F32)), NOW, "range"),
    ("huge brake", reply(np.array([-1e30, 0.0], F32)), NOW, "range"),
    ("huge steer", reply(np.array([0.0, 3.0e38], F32)), NOW, "range"),
    ("negative huge steer", reply(np.array([0.0, -5.0], F32)), NOW, "range"),
    ("confidence above one", reply(confidence=np.array([1.5], F32)), NOW, "range"),
    ("confidence negative", reply(confidence=np.array([-0.1], F32)), NOW, "range"),
]


@pytest.mark.parametrize(("name", "r", "sensor_stamp", "fault"), CASES, ids=[c[0] for c in CASES])
def test_fault_table(name: str, r: ModelReply | None, sensor_stamp: float, fault: str | None) -> None:
    verdict = check_reply(r, NOW, sensor_stamp, PERIOD_S, CFG)
    assert verdict.fault == fault
    if fault is None:
        assert verdict.accel_mps2 == pytest.approx(0.5, abs=1e-3)
        assert verdict.steering_rad == pytest.approx(0.01, abs=1e-3)
        assert verdict.confidence == pytest.approx(0.9, abs=1e-3)
    else:
        assert verdict.detail  # every fault says why


TOL = CLOCK_TOLERANCE_S


@pytest.mark.parametrize(("age", "fault"), [
    (0.0, None), (CFG.deadline_s / 2, None), (CFG.deadline_s, None), (CFG.deadline_s + 1e-7, "deadline"),
    (2 * CFG.deadline_s, "deadline"), (-TOL / 10, None), (-10 * TOL, "deadline"),
])
def test_deadline_sweep(age: float, fault: str | None) -> None:
    assert check_reply(reply(received=NOW - age), NOW, NOW, PERIOD_S, CFG).fault == fault


STALE_S = CFG.stale_ticks * PERIOD_S  # frames up to this old are fresh (plus the clock tolerance)


@pytest.mark.parametrize(("age", "fault"), [
    (0.0, None), (STALE_S - PERIOD_S, None), (STALE_S, None), (STALE_S + TOL / 2, None),
    (STALE_S + 2e-3, "stale"), (STALE_S + PERIOD_S, "stale"), (-TOL / 10, None), (-10 * TOL, "stale"),
])
def test_stale_sweep(age: float, fault: str | None) -> None:
    assert check_reply(reply(), NOW, NOW - age, PERIOD_S, CFG).fault == fault


def test_stale_ticks_and_period_are_used() -> None:
    cfg = WatchdogConfig(stale_ticks=1)
    assert check_reply(reply(), NOW, NOW - 0.1, PERIOD_S, cfg).fault is None
    assert check_reply(reply(), NOW, NOW - 0.15, PERIOD_S, cfg).fault == "stale"
    assert check_reply(reply(), NOW, NOW - 0.15, 0.2, cfg).fault is None


@pytest.mark.parametrize(("accel", "fault"), [
    (CFG.plausible_accel_min_mps2 - 0.5, "range"), (CFG.plausible_accel_min_mps2, None),
    (CFG.plausible_accel_min_mps2 + 0.1, None), (CFG.plausible_accel_max_mps2 - 0.1, None),
    (CFG.plausible_accel_max_mps2, None), (CFG.plausible_accel_max_mps2 + 0.1, "range"),
])
def test_accel_range_sweep(accel: float, fault: str | None) -> None:
    r = reply(np.array([accel, 0.0]))
    assert check_reply(r, NOW, NOW, PERIOD_S, CFG).fault == fault


@pytest.mark.parametrize(("steer", "fault"), [
    (-CFG.plausible_steer_abs_rad - 0.1, "range"), (-CFG.plausible_steer_abs_rad, None),
    (CFG.plausible_steer_abs_rad - 0.01, None), (CFG.plausible_steer_abs_rad, None),
    (CFG.plausible_steer_abs_rad + 0.01, "range"),
])
def test_steer_range_sweep(steer: float, fault: str | None) -> None:
    r = reply(np.array([0.0, steer]))
    assert check_reply(r, NOW, NOW, PERIOD_S, CFG).fault == fault


@pytest.mark.parametrize(("confidence", "fault"), [(-0.01, "range"), (0.0, None), (1.0, None), (1.01, "range")])
def test_confidence_range_sweep(confidence: float, fault: str | None) -> None:
    r = reply(confidence=np.array([confidence]))
    assert check_reply(r, NOW, NOW, PERIOD_S, CFG).fault == fault


def test_plausible_range_is_configurable() -> None:
    cfg = WatchdogConfig(plausible_accel_min_mps2=-5.0, plausible_accel_max_mps2=2.0, plausible_steer_abs_rad=0.2)
    assert check_reply(reply(np.array([-5.5, 0.0])), NOW, NOW, PERIOD_S, cfg).fault == "range"
    assert check_reply(reply(np.array([2.5, 0.0])), NOW, NOW, PERIOD_S, cfg).fault == "range"
    assert check_reply(reply(np.array([0.0, 0.25])), NOW, NOW, PERIOD_S, cfg).fault == "range"
    assert check_reply(reply(np.array([-4.5, 0.15])), NOW, NOW, PERIOD_S, cfg).fault is None


def test_deadline_is_configurable() -> None:
    cfg = WatchdogConfig(deadline_s=0.05)
    assert check_reply(reply(received=NOW - 0.06), NOW, NOW, PERIOD_S, cfg).fault == "deadline"
    assert check_reply(reply(received=NOW - 0.04), NOW, NOW, PERIOD_S, cfg).fault is None


def test_fault_detail_never_echoes_untrusted_content() -> None:
    secret = "x" * 10_000
    verdict = check_reply(reply(secret), NOW, NOW, PERIOD_S, CFG)
    assert verdict.fault == "shape" and len(verdict.detail) < 200 and "str" in verdict.detail
    verdict = check_reply(reply(np.zeros((3, 4), F32)), NOW, NOW, PERIOD_S, CFG)
    assert "(3, 4)" in verdict.detail and "float32" in verdict.detail


DETAILS = [
    ("dead", reply(alive=False), NOW, "model process is dead"),
    ("no reply", reply(received=None), NOW, "no reply by the deadline"),
    ("late", reply(received=NOW - 0.15), NOW, "reply age 0.150 s outside [0, 0.1] s"),
    ("stale", reply(), NOW - 0.5, "sensor frame age 0.500 s"),
    ("shape", reply("x"), NOW, "action str, confidence ndarray(1,):float32"),
    ("nan", reply(np.array([np.nan, 0.0], F32)), NOW, "non-finite model output"),
    ("accel", reply(np.array([1e30, 0.0])), NOW, "accel 1e+30 m/s^2 implausible"),
    ("steer", reply(np.array([0.0, -3.0])), NOW, "steering -3 rad implausible"),
    ("confidence", reply(confidence=np.array([1.5])), NOW, "confidence 1.5 outside [0, 1]"),
]


@pytest.mark.parametrize(("name", "r", "stamp", "detail"), DETAILS, ids=[d[0] for d in DETAILS])
def test_fault_details_are_exact(name: str, r: ModelReply, stamp: float, detail: str) -> None:
    assert check_reply(r, NOW, stamp, PERIOD_S, CFG).detail == detail


def test_timing_boundaries_are_exact() -> None:
    """Ages exactly at the limits are still fresh (power-of-two times keep the arithmetic exact)."""
    from driveloop.safety.watchdog import CLOCK_TOLERANCE_S as TOL

    cfg = WatchdogConfig(deadline_s=0.25, stale_ticks=3)
    period, now = 0.25, 1.0
    assert check_reply(reply(received=now - 0.25), now, now, period, cfg).fault is None
    assert check_reply(reply(received=now + TOL), now, now, period, cfg).fault is None
    assert check_reply(reply(received=now + 2 * TOL), now, now, period, cfg).fault == "deadline"
    assert check_reply(reply(received=now), now, now - 0.75 - TOL, period, cfg).fault is None
    assert check_reply(reply(received=now), now, now - 0.75 - 2 * TOL, period, cfg).fault == "stale"
    assert check_reply(reply(received=now), now, now + TOL, period, cfg).fault is None
    assert check_reply(reply(received=now), now, now + 2 * TOL, period, cfg).fault == "stale"
