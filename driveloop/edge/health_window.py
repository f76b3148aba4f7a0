"""Pure verdict of a trial boot's health window: may the new model be committed?

The caller (control loop / fleet runner) counts what happened while the trial model drove; this rule
turns it into commit or revert. A window with too few ticks is *not yet* a verdict (``None``): the
vehicle keeps the model on trial (a crash before the verdict counts as a failed boot attempt).
"""

from __future__ import annotations

from dataclasses import dataclass

from driveloop.core.exceptions import ConfigError


@dataclass(frozen=True)
class HealthWindowResult:
    """What the trial model did during its health window."""

    model_loaded: bool
    ticks: int = 0
    deadline_misses: int = 0
    watchdog_trips: int = 0
    collisions: int = 0

    def __post_init__(self) -> None:
        for name in ("ticks", "deadline_misses", "watchdog_trips", "collisions"):
            if getattr(self, name) < 0:
                raise ConfigError(f"health window {name} must be >= 0")
        if self.deadline_misses > self.ticks:
            raise ConfigError("health window: more deadline misses than ticks")


@dataclass(frozen=True)
class HealthWindowPolicy:
    """Thresholds of the health window (ticks at CONTROL_PERIOD_S; 100 ticks = 10 s)."""

    min_ticks: int = 100
    max_deadline_miss_ratio: float = 0.01
    max_watchdog_trips: int = 0
    max_collisions: int = 0

    def __post_init__(self) -> None:
        if self.min_ticks < 1 or not 0.0 <= self.max_deadline_miss_ratio <= 1.0:
            raise ConfigError("health window: min_ticks >= 1 and 0 <= max_deadline_miss_ratio <= 1")
        if self.max_watchdog_trips < 0 or self.max_collisions < 0:
            raise ConfigError("health window: limits must be >= 0")

    def judge(self, r: HealthWindowResult) -> tuple[bool | None, str]:
        """(True, why) commit, (False, why) revert, (None, why) keep watching."""
        if not r.model_loaded:
            return False, "model failed to load"
        if r.watchdog_trips > self.max_watchdog_trips:
            return False, f"{r.watchdog_trips} watchdog trips (max {self.max_watchdog_trips})"
        if r.collisions > self.max_collisions:
            return False, f"{r.collisions} collisions (max {self.max_collisions})"
        if r.ticks and r.deadline_misses / r.ticks > self.max_deadline_miss_ratio:
            return False, f"{r.deadline_misses}/{r.ticks} inference deadline misses (max ratio {self.max_deadline_miss_ratio})"
        if r.ticks < self.min_ticks:
            return None, f"only {r.ticks}/{self.min_ticks} ticks observed"
        return True, f"healthy over {r.ticks} ticks"
