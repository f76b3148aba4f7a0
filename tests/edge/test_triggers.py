"""Trigger engine: the safe expression language (table of good and bad expressions), modes, intervals."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driveloop.edge.triggers import (
    SIGNAL_NAMES,
    FiredEvent,
    TriggerEngine,
    TriggerSpec,
    builtin_triggers,
    compile_condition,
)
from driveloop.core.exceptions import ConfigError

BASE = {"ttc": 5.0, "fallback": False, "confidence": 0.9, "speed": 20.0, "accel": 0.0, "steering": 0.0,
        "collision": False}

GOOD = [
    # (name, expression, signal overrides, expected)
    ("ttc_low", "ttc < 1.5", {"ttc": 1.0}, True),
    ("ttc_high", "ttc < 1.5", {}, False),
    ("ttc_at_threshold", "ttc < 1.5", {"ttc": 1.5}, False),
    ("ttc_le_at_threshold", "ttc <= 1.5", {"ttc": 1.5}, True),
    ("or_fallback", "ttc < 1.5 or fallback", {"fallback": True}, True),
    ("and_both", "confidence < 0.3 and speed > 10", {"confidence": 0.2}, True),
    ("and_one", "confidence < 0.3 and speed > 10", {"confidence": 0.2, "speed": 5.0}, False),
    ("not", "not fallback", {}, True),
    ("abs", "abs(steering) > 0.2", {"steering": -0.3}, True),
    ("min_max", "min(ttc, 10) < 2 or max(speed, 0) > 30", {"speed": 31.0}, True),
    ("arith", "speed * speed - 2 * 4 * accel > 500", {"accel": -20.0}, True),
    ("neg_literal", "accel < -4.0", {"accel": -5.0}, True),
    ("chain", "1 < ttc < 3", {"ttc": 2.0}, True),
    ("chain_false", "1 < ttc < 3", {"ttc": 4.0}, False),
    ("eq_bool", "fallback == true", {"fallback": True}, True),
    ("ne", "speed != 20", {}, False),
    ("nan_is_false", "confidence < 0.3", {"confidence": math.nan}, False),
    ("nan_name_is_false", "confidence", {"confidence": math.nan}, False),
    ("inf_ttc", "ttc < 1.5", {"ttc": math.inf}, False),
    ("constant", "true", {}, True),
    ("parens", "(ttc < 1.5 or fallback) and not collision", {"ttc": 1.0}, True),
]


@pytest.mark.parametrize("name,expr,over,expected", GOOD, ids=[g[0] for g in GOOD])
def test_good_expressions(name: str, expr: str, over: dict[str, float | bool], expected: bool) -> None:
    cond = compile_condition(expr, SIGNAL_NAMES)
    assert cond.evaluate({**BASE, **over}) is expected


BAD = [
    ("empty", "", "non-empty"),
    ("syntax", "ttc <", "not a valid expression"),
    ("string", "ttc < '1'", "Constant"),
    ("attribute", "speed.real > 1", "Attribute"),
    ("import", "__import__('os').system('x')", "may be called"),
    ("call_unknown", "eval('1')", "may be called"),
    ("subscript", "speed[0] > 1", "Subscript"),
    ("lambda", "(lambda: 1)() > 0", "may be called"),
    ("pow", "speed ** 2 > 1", "BinOp"),
    ("div", "speed / 0 > 1", "BinOp"),
    ("in", "speed in (1, 2)", "comparisons"),
    ("is", "speed is 1", "comparisons"),
    ("walrus", "(x := 1) > 0", "NamedExpr"),
    ("keyword_arg", "max(speed, default=1) > 0", "may be called"),
    ("abs_two_args", "abs(speed, 1) > 0", "one argument"),
    ("min_one_arg", "min(speed) > 0", "two or more"),
    ("bare_func", "abs > 0", "must be called"),
    ("unknown_signal", "tcc < 1.5", "unknown signals"),
    ("too_long", "speed > 1 or " * 60 + "true", "longer than"),
    ("statement", "x = 1", "not a valid expression"),
]


@pytest.mark.parametrize("name,expr,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_expressions(name: str, expr: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        compile_condition(expr, SIGNAL_NAMES)


def test_condition_names_and_missing_signal() -> None:
    cond = compile_condition("confidence < 0.3 and speed > 10")
    assert cond.names == frozenset({"confidence", "speed"})
    with pytest.raises(ConfigError, match="missing signals"):
        cond.evaluate({"speed": 1.0})


def _run(engine: TriggerEngine, values: list[float], dt_s: float = 0.1) -> list[float]:
    """Feed ttc values at fixed dt; return the times a trigger fired."""
    fired = []
    for i, ttc in enumerate(values):
        now_s = round(i * dt_s, 6)
        fired += [e.t_s for e in engine.evaluate({**BASE, "ttc": ttc}, now_s)]
    return fired


def test_rising_edge_fires_once_per_crossing() -> None:
    eng = TriggerEngine([TriggerSpec("low_ttc", "ttc < 1.5", mode="rising_edge")])
    assert _run(eng, [5, 1, 1, 1, 5, 1, 1]) == [0.1, 0.5]


def test_always_fires_every_tick_while_true() -> None:
    eng = TriggerEngine([TriggerSpec("low_ttc", "ttc < 1.5", mode="always")])
    assert _run(eng, [5, 1, 1, 5, 1]) == [0.1, 0.2, 0.4]


@pytest.mark.parametrize("interval_s,expected", [
    (0.0, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]),
    (0.2, [0.0, 0.2, 0.4]),
    (0.25, [0.0, 0.3]),
    (1.0, [0.0]),
])
def test_min_interval_always(interval_s: float, expected: list[float]) -> None:
    eng = TriggerEngine([TriggerSpec("t", "ttc < 1.5", mode="always", min_interval_s=interval_s)])
    assert _run(eng, [1] * 6) == expected


def test_min_interval_suppresses_edges_without_replaying_them() -> None:
    eng = TriggerEngine([TriggerSpec("t", "ttc < 1.5", min_interval_s=0.5)])
    # edges at 0.0, 0.2 (suppressed: inside 0.5 s, and not re-fired while it stays true), 0.6
    assert _run(eng, [1, 5, 1, 1, 1, 5, 1]) == [0.0, 0.6]


def test_expiry_and_priority_order() -> None:
    eng = TriggerEngine([
        TriggerSpec("campaign", "speed > 10", mode="always", priority=3, expires_at_s=0.15),
        TriggerSpec("urgent", "speed > 10", mode="always", priority=7),
    ])
    first = eng.evaluate(BASE, 0.0)
    assert [e.trigger for e in first] == ["urgent", "campaign"]
    assert first[0] == FiredEvent("urgent", 0.0, 7, 5.0, 5.0)
    assert [e.trigger for e in eng.evaluate(BASE, 0.2)] == ["urgent"]


def test_set_specs_keeps_state_of_surviving_triggers() -> None:
    spec = TriggerSpec("t", "ttc < 1.5")
    eng = TriggerEngine([spec])
    assert _run(eng, [1]) == [0.0]
    eng.set_specs([spec, TriggerSpec("u", "ttc < 2")])
    fired = eng.evaluate({**BASE, "ttc": 1.0}, 0.1)
    assert [e.trigger for e in fired] == ["u"]  # "t" is still high: no new edge


@pytest.mark.parametrize("kwargs,reason", [
    ({"name": "Bad Name"}, "must match"),
    ({"mode": "sometimes"}, "mode"),
    ({"min_interval_s": -1.0}, "min_interval_s"),
    ({"pre_s": math.inf}, "pre_s"),
    ({"priority": 0}, "priority"),
    ({"priority": 10}, "priority"),
    ({"condition": "speed ** 2"}, "BinOp"),
])
def test_trigger_spec_validation(kwargs: dict[str, object], reason: str) -> None:
    args = {"name": "ok", "condition": "speed > 1", **kwargs}
    with pytest.raises(ConfigError, match=reason):
        TriggerSpec(**args)  # type: ignore[arg-type]


def test_engine_rejects_duplicates_and_unknown_signals() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        TriggerEngine([TriggerSpec("a", "speed > 1"), TriggerSpec("a", "speed > 2")])
    with pytest.raises(ConfigError, match="unknown signals"):
        TriggerEngine([TriggerSpec("a", "sped > 1")])
    TriggerEngine([TriggerSpec("a", "sped > 1")], known_names=None)  # free-form for other users


def test_builtin_triggers_fire_on_their_hazards() -> None:
    eng = TriggerEngine(builtin_triggers())
    assert {s.name for s in eng.specs} == {"collision", "fallback_activation", "hard_brake", "low_ttc", "low_confidence"}
    calm = {n: 0.0 for n in SIGNAL_NAMES} | {"ttc": math.inf, "confidence": 0.9, "model_valid": True}
    assert eng.evaluate(calm, 0.0) == []
    hazards = {"collision": True, "fallback": True, "accel": -5.0, "ttc": 1.0, "confidence": 0.1}
    fired = eng.evaluate(calm | hazards, 0.1)
    assert [e.trigger for e in fired] == ["collision", "fallback_activation", "hard_brake", "low_ttc", "low_confidence"]
    with pytest.raises(ConfigError):
        builtin_triggers(hard_brake_mps2=1.0)


# ---------------------------------------------------------------- property: same truth as Python

NUM_NAMES = ["ttc", "speed", "accel", "confidence"]
BOOL_NAMES = ["fallback", "collision"]
_num = st.recursive(
    st.one_of(st.sampled_from(NUM_NAMES), st.integers(-50, 50).map(str), st.floats(-50, 50).map(lambda f: repr(round(f, 3)))),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda x: f"-{x}"),
        inner.map(lambda x: f"abs({x})"),
        st.tuples(st.sampled_from(["min", "max"]), st.lists(inner, min_size=2, max_size=3)).map(
            lambda t: f"{t[0]}({', '.join(t[1])})"),
    ),
    max_leaves=4,
)
_cmp = st.tuples(_num, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), _num).map(" ".join)
_bool = st.recursive(
    st.one_of(_cmp, st.sampled_from(BOOL_NAMES)),
    lambda inner: st.one_of(
        inner.map(lambda x: f"not ({x})"),
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(lambda t: f"({t[0]}) {t[1]} ({t[2]})"),
    ),
    max_leaves=5,
)
_signals = st.fixed_dictionaries({
    **{n: st.floats(-100, 100, allow_nan=False) for n in NUM_NAMES}, **{n: st.booleans() for n in BOOL_NAMES}})


@settings(max_examples=300, derandomize=True, deadline=None)
@given(expr=_bool, signals=_signals)
def test_condition_agrees_with_python(expr: str, signals: dict[str, float | bool]) -> None:
    expected = bool(eval(expr, {"__builtins__": {}, "abs": abs, "min": min, "max": max}, dict(signals)))
    assert compile_condition(expr, SIGNAL_NAMES).evaluate(signals) is expected
