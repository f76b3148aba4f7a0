"""Recording triggers: a pure engine that turns per-tick signals into events (no I/O, clock passed in).

Conditions are a small, safe expression language over named signals, modelled on AWS IoT FleetWise
campaign expressions, e.g. ``ttc < 1.5 or fallback``, ``confidence < 0.3 and speed > 10``,
``abs(steering) > 0.2``. Grammar (parsed with ``ast``, anything else is a ConfigError):
``or``/``and``/``not``; comparisons ``< <= > >= == !=`` (chains allowed); ``+ - *`` and unary minus;
numbers and ``true``/``false``; signal names; the functions ``abs``, ``min``, ``max``.
No attributes, subscripts, strings, lambdas or other calls, so a campaign fetched from the cloud can
never run code on the vehicle. A missing value is NaN, and every comparison with NaN is false.

The cloud campaign engine reuses ``compile_condition`` to check campaign expressions before approval.
"""

from __future__ import annotations

import ast
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, cast

from driveloop.core.exceptions import ConfigError
from driveloop.sim.scenarios import ENVIRONMENT_SIGNALS

logger = logging.getLogger(__name__)

# Signals the vehicle provides each tick (contracts.segment.TickRecord.signals()); recorder conditions
# must only use these, so a typo in a campaign is rejected when it is loaded, not silently false.
# The ``env_*`` signals (``sim.scenarios.ENVIRONMENT_SIGNALS``) say which environment the vehicle drives in (the
# recorder sets them from its scenario), so a campaign can collect in one environment only.
SIGNAL_NAMES = frozenset({
    "t", "speed", "accel", "steering", "confidence", "latency_ms", "ttc",
    "fallback", "activation", "fcw", "aeb", "watchdog", "model_valid", "collision",
    *ENVIRONMENT_SIGNALS,
})
MAX_CONDITION_CHARS = 500
MAX_CONDITION_NODES = 100  # a bound on evaluation cost per tick
_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")

Signals = Mapping[str, float | bool]
_Eval = Callable[[Signals], float | bool]

_FUNCS: dict[str, Callable[..., float]] = {"abs": abs, "min": min, "max": max}
_CMP: dict[type[ast.cmpop], Callable[[float, float], bool]] = {
    ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b, ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
}
_BIN: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
}
_CONSTS = {"true": True, "false": False, "True": True, "False": False}


def _truth(v: float | bool) -> bool:
    """Truth of a value: NaN (missing) is false, unlike Python's bool(nan)."""
    return bool(v) and not (isinstance(v, float) and math.isnan(v))


class Condition:
    """A compiled condition. ``names`` are the signals it reads; ``evaluate`` never runs user code."""

    def __init__(self, text: str, fn: _Eval, names: frozenset[str]) -> None:
        self.text = text
        self.names = names
        self._fn = fn

    def evaluate(self, signals: Signals) -> bool:
        """True when the condition holds; ConfigError if a signal it needs is missing."""
        missing = self.names - signals.keys()
        if missing:
            raise ConfigError(f"condition {self.text!r}: missing signals {sorted(missing)}")
        return _truth(self._fn(signals))

    def __repr__(self) -> str:
        return f"Condition({self.text!r})"


def compile_condition(text: str, known_names: Iterable[str] | None = None) -> Condition:
    """Parse and check ``text``; ConfigError with the reason if it is not in the safe language or
    (when ``known_names`` is given) reads a signal that does not exist."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("condition must be a non-empty string")
    if len(text) > MAX_CONDITION_CHARS:
        raise ConfigError(f"condition longer than {MAX_CONDITION_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"condition {text!r} is not a valid expression: {e.msg}") from e
    if sum(1 for _ in ast.walk(tree)) > MAX_CONDITION_NODES:
        raise ConfigError(f"condition {text!r} is too complex (>{MAX_CONDITION_NODES} nodes)")
    names: set[str] = set()
    fn = _compile(tree.body, text, names)
    if known_names is not None:
        unknown = names - set(known_names)
        if unknown:
            raise ConfigError(f"condition {text!r} uses unknown signals {sorted(unknown)}; "
                              f"known: {sorted(known_names)}")
    return Condition(text.strip(), fn, frozenset(names))


def _compile(node: ast.AST, text: str, names: set[str]) -> _Eval:
    """AST -> closure tree (whitelist: every node type not handled here is rejected)."""
    if isinstance(node, ast.BoolOp):
        parts = [_compile(v, text, names) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda s: all(_truth(p(s)) for p in parts)
        return lambda s: any(_truth(p(s)) for p in parts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        inner = _compile(node.operand, text, names)
        return lambda s: not _truth(inner(s))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _compile(node.operand, text, names)
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        return lambda s: sign * float(inner(s))
    if isinstance(node, ast.Compare):
        ops = [_CMP.get(type(o)) for o in node.ops]
        if any(o is None for o in ops):
            raise ConfigError(f"condition {text!r}: only < <= > >= == != comparisons are allowed")
        terms = [_compile(t, text, names) for t in (node.left, *node.comparators)]
        pairs = list(zip(ops, range(len(ops))))

        def compare(s: Signals) -> bool:
            vals = [float(t(s)) for t in terms]
            return all(op(vals[i], vals[i + 1]) for op, i in pairs)  # type: ignore[misc]

        return compare
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        op = _BIN[type(node.op)]
        left, right = _compile(node.left, text, names), _compile(node.right, text, names)
        return lambda s: op(float(left(s)), float(right(s)))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS or node.keywords or not node.args:
            raise ConfigError(f"condition {text!r}: only abs(x), min(...), max(...) may be called")
        if node.func.id == "abs" and len(node.args) != 1:
            raise ConfigError(f"condition {text!r}: abs takes one argument")
        if node.func.id != "abs" and len(node.args) < 2:
            raise ConfigError(f"condition {text!r}: {node.func.id} takes two or more arguments")
        f = _FUNCS[node.func.id]
        args = [_compile(a, text, names) for a in node.args]
        return lambda s: f(*(float(a(s)) for a in args))
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        value = cast(float | bool, node.value)
        return lambda s: value
    if isinstance(node, ast.Name):
        if node.id in _CONSTS:
            const = _CONSTS[node.id]
            return lambda s: const
        if node.id in _FUNCS:
            raise ConfigError(f"condition {text!r}: {node.id} must be called")
        names.add(node.id)
        key = node.id
        return lambda s: s[key]
    raise ConfigError(f"condition {text!r}: {type(node).__name__} is not allowed "
                      "(only comparisons, and/or/not, + - *, numbers, signal names, abs/min/max)")


@dataclass(frozen=True)
class TriggerSpec:
    """One trigger (a built-in or a campaign's). ``rising_edge`` fires when the condition becomes
    true, ``always`` on every tick it holds; either way at most once per ``min_interval_s``.
    ``pre_s``/``post_s`` is the window around the event worth keeping; ``priority`` >= 1 ranks
    event segments (0 is reserved for routine data). ``expires_at_s`` ends a campaign."""

    name: str
    condition: str
    mode: Literal["always", "rising_edge"] = "rising_edge"
    min_interval_s: float = 0.0
    pre_s: float = 5.0
    post_s: float = 5.0
    priority: int = 1
    expires_at_s: float | None = None
    compiled: Condition = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigError(f"trigger name {self.name!r} must match {_NAME_RE.pattern}")
        if self.mode not in ("always", "rising_edge"):
            raise ConfigError(f"trigger {self.name}: mode must be 'always' or 'rising_edge', got {self.mode!r}")
        for attr in ("min_interval_s", "pre_s", "post_s"):
            v = getattr(self, attr)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"trigger {self.name}: {attr} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool) or not 1 <= self.priority <= 9:
            raise ConfigError(f"trigger {self.name}: priority must be an integer in 1..9, got {self.priority!r}")
        object.__setattr__(self, "compiled", compile_condition(self.condition))


@dataclass(frozen=True)
class FiredEvent:
    """A trigger that fired at ``t_s``; the recorder logs it on /safety/event and flags the segment."""

    trigger: str
    t_s: float
    priority: int
    pre_s: float
    post_s: float


def builtin_triggers(hard_brake_mps2: float = -4.0, ttc_threshold_s: float = 1.5,
                     min_confidence: float = 0.3) -> tuple[TriggerSpec, ...]:
    """The vehicle's standing triggers (issue 3): collision, fallback activation, hard brake,
    TTC below threshold, low model confidence."""
    if not hard_brake_mps2 < 0 or not ttc_threshold_s > 0 or not 0 < min_confidence < 1:
        raise ConfigError("builtin triggers need hard_brake_mps2 < 0, ttc_threshold_s > 0, 0 < min_confidence < 1")
    return (
        TriggerSpec("collision", "collision", priority=9, pre_s=10.0, post_s=5.0),
        TriggerSpec("fallback_activation", "fallback", priority=5, min_interval_s=1.0),
        TriggerSpec("hard_brake", f"accel < {hard_brake_mps2!r}", priority=4, min_interval_s=2.0),
        TriggerSpec("low_ttc", f"ttc < {ttc_threshold_s!r}", priority=4, min_interval_s=2.0),
        TriggerSpec("low_confidence", f"confidence < {min_confidence!r}", priority=2, min_interval_s=2.0),
    )


class TriggerEngine:
    """Evaluates a set of triggers tick by tick. Pure: state is the previous truth value and the
    last fire time of each trigger; the clock is the ``now_s`` passed in."""

    def __init__(self, specs: Iterable[TriggerSpec], known_names: Iterable[str] | None = SIGNAL_NAMES) -> None:
        self._known = None if known_names is None else frozenset(known_names)
        self._specs: tuple[TriggerSpec, ...] = ()
        self._prev: dict[str, bool] = {}
        self._last_fired_s: dict[str, float] = {}
        self.set_specs(specs)

    @property
    def specs(self) -> tuple[TriggerSpec, ...]:
        return self._specs

    def set_specs(self, specs: Iterable[TriggerSpec]) -> None:
        """Replace the triggers (e.g. new campaigns); state is kept for triggers whose name stays."""
        specs = tuple(specs)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate trigger names in {names}")
        for s in specs:
            if self._known is not None and not s.compiled.names <= self._known:
                raise ConfigError(f"trigger {s.name}: unknown signals {sorted(s.compiled.names - self._known)}")
        self._specs = specs
        self._prev = {n: v for n, v in self._prev.items() if n in names}
        self._last_fired_s = {n: v for n, v in self._last_fired_s.items() if n in names}

    def evaluate(self, signals: Signals, now_s: float) -> list[FiredEvent]:
        """Events fired at ``now_s``, highest priority first."""
        fired: list[FiredEvent] = []
        for s in self._specs:
            if s.expires_at_s is not None and now_s >= s.expires_at_s:
                continue
            holds = s.compiled.evaluate(signals)
            prev = self._prev.get(s.name, False)
            self._prev[s.name] = holds
            if not holds or (s.mode == "rising_edge" and prev):
                continue
            last = self._last_fired_s.get(s.name)
            if last is not None and now_s - last < s.min_interval_s:
                continue
            self._last_fired_s[s.name] = now_s
            fired.append(FiredEvent(s.name, float(now_s), s.priority, s.pre_s, s.post_s))
        fired.sort(key=lambda e: -e.priority)
        if fired:
            logger.debug("triggers fired at %.2fs: %s", now_s, [e.trigger for e in fired])
        return fired
