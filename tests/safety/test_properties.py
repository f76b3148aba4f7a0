"""Property tests: no model output, however malformed, yields a command outside the actuator envelope.

Counts (default run): the seeded, numpy-drawn sweep feeds 100,000 random model outputs (valid, huge,
NaN/inf, wrong shape, wrong dtype, None, strings, bytes, nested containers; with dead/late/stale replies
and random tracks) through the real supervisor, plus hypothesis: 600 arbitrary objects, 1,000 arbitrary
limit-function inputs and 100 arbitrary 30-tick sequences (3,000 ticks) — 104,600 model outputs in all. Under mutation testing (``MUTANT_UNDER_TEST``
set by mutmut) the counts drop twenty-fold so each mutant runs in seconds.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from driveloop.safety import Decision, LimitsConfig, ModelReply, Supervisor, SupervisorInputs, TrackData
from driveloop.safety.limits import limit_command

from ._harness import UNDER_MUTMUT

LIMITS = LimitsConfig()
DT = 0.1
EPS = 1e-9
SCALE = 20 if UNDER_MUTMUT else 1
SWEEP_TICKS = 100_000 // SCALE


def assert_in_envelope(decision: Decision, prev: tuple[float, float] | None) -> None:
    a, s = decision.accel_mps2, decision.steering_rad
    assert isinstance(a, float) and isinstance(s, float)
    assert math.isfinite(a) and math.isfinite(s)
    assert -LIMITS.max_decel_mps2 - EPS <= a <= LIMITS.max_accel_mps2 + EPS
    assert abs(s) <= LIMITS.max_steer_rad + EPS
    if prev is not None:
        assert a - prev[0] <= LIMITS.max_jerk_mps3 * DT + EPS
        fall = LIMITS.emergency_jerk_mps3 if decision.source == "fallback" else LIMITS.max_jerk_mps3
        assert prev[0] - a <= fall * DT + EPS
        assert abs(s - prev[1]) <= LIMITS.max_steer_rate_radps * DT + EPS
    if decision.source == "model":
        assert decision.watchdog is None and not decision.aeb


_SHAPES = [(), (1,), (3,), (2, 1), (2, 2), (1, 1, 2), (0,), (4, 2)]
_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, object, "U4"]
_HUGE = np.array([-3e38, -1e30, -1e6, 1e6, 1e30, 3e38])
_NONFINITE = np.array([np.nan, np.inf, -np.inf, 0.5])
_FLOATS = (np.float16, np.float32, np.float64)
_OTHER = ([[0.5, [None]]], {"a": 1}, (1.0, 2.0), 3.5, "accelerate", "", b"\x00\xff", [0.5, 0.0])


def _garbage(kind: int, u: np.ndarray) -> object:
    """One model output of the given kind, built from pre-drawn uniforms ``u`` (vectorised draw)."""
    if kind == 0:  # valid and plausible
        return np.array([-12.0 + 18.0 * u[0], -1.0 + 2.0 * u[1]], np.float32)
    if kind == 1:  # huge
        return _HUGE[(u[:2] * len(_HUGE)).astype(int)].astype(np.float32)
    if kind == 2:  # NaN / inf mixtures
        return _NONFINITE[(u[:2] * len(_NONFINITE)).astype(int)].astype(np.float32)
    if kind == 3:  # wrong shape
        return np.full(_SHAPES[int(u[0] * len(_SHAPES))], u[1], np.float32)
    if kind == 4:  # wrong dtype
        return np.array([1, 0], dtype=_DTYPES[int(u[0] * len(_DTYPES))])
    if kind == 5:
        return None
    if kind == 6:  # nested containers, python scalars, strings, bytes
        return _OTHER[int(u[0] * len(_OTHER))]
    if kind == 7:  # any float width, any value, either accepted shape
        values = np.array([-20.0 + 40.0 * u[0], -2.0 + 4.0 * u[1]], dtype=_FLOATS[int(u[2] * 3)])
        return values if u[3] < 0.5 else values.reshape(1, 2)
    return np.array([-3.0 + 6.0 * u[0], -0.3 + 0.6 * u[1]], np.float64)  # kinds 8, 9: valid driving


_CONFIDENCES = [np.array([np.nan], np.float32), None, np.array([2.0], np.float32), "high"]


def _confidence(u: float) -> object:
    return np.array([u / 0.8], np.float32) if u < 0.8 else _CONFIDENCES[int((u - 0.8) * 20)]


def test_seeded_sweep_of_malformed_outputs() -> None:
    """One continuous drive in phases of 100 ticks: 20 healthy ticks (the model gets control back), then 80
    whose model output, confidence, liveness, timing and track are drawn at random: 100,000 random outputs."""
    rng = np.random.default_rng(20240)
    n = -(-SWEEP_TICKS // 80) * 100  # whole phases of 100 ticks, 80 of them random
    kinds = rng.integers(10, size=n)
    u = rng.random((n, 10))
    speeds = np.clip(20.0 + np.cumsum(rng.normal(0, 0.5, n)), 0.0, 40.0)
    sup = Supervisor()
    prev: tuple[float, float] | None = None
    sources, valid, random_outputs = set(), np.array([0.3, 0.01], np.float32), 0
    for i in range(n):
        now, row = i * DT, u[i]
        if i % 100 < 20:
            reply, track, stamp = ModelReply(valid, np.array([0.8], np.float32), now), None, now
        else:
            random_outputs += 1
            fault = row[4]
            received = None if fault < 0.03 else now - (0.5 if fault < 0.05 else 0.0)
            stamp = now - (1.0 if 0.05 <= fault < 0.07 else 0.0)
            reply = ModelReply(_garbage(int(kinds[i]), row), _confidence(row[5]), received, alive=fault < 0.99)
            track = None if row[6] < 0.3 else TrackData(-1.0 + 121.0 * row[7], -10.0 + 40.0 * row[8], 40.0 * row[9])
        inputs = SupervisorInputs(now, float(speeds[i]), 0.0, 0.3, 0.01, track, stamp, reply,
                                  model_enabled=i % 1000 != 999)
        decision = sup.step(inputs)
        assert_in_envelope(decision, prev)
        prev = (decision.accel_mps2, decision.steering_rad)
        sources.add(decision.source)
    assert random_outputs >= SWEEP_TICKS
    assert sources == {"model", "fallback"}  # both paths were exercised


_floats = st.floats(allow_nan=True, allow_infinity=True)
_arrays = hnp.arrays(
    dtype=st.one_of(hnp.floating_dtypes(), hnp.integer_dtypes(), hnp.boolean_dtypes(), hnp.complex_number_dtypes()),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
)
_objects = st.one_of(
    st.none(), st.text(max_size=8), _floats, st.integers(), _arrays,
    st.recursive(st.one_of(_floats, st.none(), st.text(max_size=3)), lambda c: st.lists(c, max_size=3), max_leaves=6),
)


@settings(max_examples=600 // SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(action=_objects, confidence=st.one_of(_objects, st.just(np.array([0.5], np.float32))),
       alive=st.booleans(), late=st.booleans(), prev_accel=st.floats(-8, 3), speed=st.floats(0, 40),
       gap=st.one_of(st.none(), st.floats(-5, 200)))
def test_any_object_as_model_output(action: object, confidence: object, alive: bool, late: bool,
                                    prev_accel: float, speed: float, gap: float | None) -> None:
    sup = Supervisor()
    track = None if gap is None else TrackData(gap, speed, 0.0)
    first = sup.step(SupervisorInputs(0.0, speed, prev_accel, 0.0, 0.0, track, 0.0,
                                      ModelReply(np.array([prev_accel, 0.0], np.float32), np.array([0.5], np.float32), 0.0)))
    assert_in_envelope(first, None)
    decision = sup.step(SupervisorInputs(DT, speed, prev_accel, 0.0, 0.0, track, DT,
                                         ModelReply(action, confidence, None if late else DT, alive)))
    assert_in_envelope(decision, (first.accel_mps2, first.steering_rad))


@settings(max_examples=1000 // SCALE, deadline=None)
@given(accel=_floats, steer=_floats, prev_accel=_floats, prev_steer=_floats,
       dt=st.one_of(_floats, st.just(DT)), emergency=st.booleans())
def test_limit_command_envelope(accel: float, steer: float, prev_accel: float, prev_steer: float, dt: float,
                                emergency: bool) -> None:
    a, s = limit_command(accel, steer, prev_accel, prev_steer, dt, emergency, LIMITS)
    assert math.isfinite(a) and math.isfinite(s)
    assert -LIMITS.max_decel_mps2 <= a <= LIMITS.max_accel_mps2 and abs(s) <= LIMITS.max_steer_rad
    if math.isfinite(dt) and 0 < dt <= 1.0 and math.isfinite(prev_accel) and abs(prev_accel) <= 3.0:
        assert a - prev_accel <= LIMITS.max_jerk_mps3 * dt + EPS
        jerk = LIMITS.emergency_jerk_mps3 if emergency else LIMITS.max_jerk_mps3
        assert prev_accel - a <= jerk * dt + EPS


_tick = st.tuples(
    st.one_of(hnp.arrays(np.float32, 2, elements=st.floats(width=32)), hnp.arrays(np.float64, (1, 2)), st.none()),
    st.sampled_from(["ok", "ok", "ok", "late", "dead", "stale"]),
    st.one_of(st.none(), st.tuples(st.floats(0, 150), st.floats(-20, 30), st.floats(0, 40))),
)


@settings(max_examples=100 // SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ticks=st.lists(_tick, min_size=30, max_size=30))
def test_arbitrary_sequences(ticks: list[tuple[object, str, tuple[float, float, float] | None]]) -> None:
    sup = Supervisor()
    prev: tuple[float, float] | None = None
    for i, (action, status, lead) in enumerate(ticks):
        now = i * DT
        reply = ModelReply(action, np.array([0.7], np.float32), None if status == "late" else now, status != "dead")
        track = TrackData(*lead) if lead is not None else None
        decision = sup.step(SupervisorInputs(now, 15.0, 0.0, 0.2, 0.01, track, now - (1.0 if status == "stale" else 0.0),
                                             reply))
        assert_in_envelope(decision, prev)
        if status != "ok":
            assert decision.source == "fallback" and decision.watchdog is not None
        prev = (decision.accel_mps2, decision.steering_rad)
