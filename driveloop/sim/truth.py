"""Was a fallback activation called for? Judged on the simulator's ground truth, not on the safety rules.

``driveloop safety-suite`` drives nominal episodes; every fallback activation there must be explained by
a real hazard, or it is a *false* activation (the layer braked or steered for nothing). The judge must
not be the rule itself (a rule always agrees with itself), so it uses the standard hazard measures of
the driver-assistance norms on the true state the rule acted on:

- longitudinal (AEB/FCW activations): time-to-collision under ``ttc_s`` (2 s, the forward-collision
  warning range of ISO 15623 / Euro NCAP) or a time headway under ``headway_s`` (0.5 s: a car that cut
  in closer than half a second of travel);
- lateral (lane activations): the vehicle's edge is over the lane marking, or reaches it within
  ``tlc_s`` at its current lateral speed (time-to-line-crossing under 1 s, the ISO 17361 lane-departure
  warning range);
- watchdog activations are the model failing (late, NaN, dead): never "for nothing", reported as such.

The measures are pure functions of one :class:`~driveloop.sim.world.WorldSnapshot`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from driveloop.core.exceptions import ConfigError
from driveloop.sim.world import WorldSnapshot, gap_m, ttc_s


@dataclass(frozen=True)
class HazardCriteria:
    ttc_s: float = 2.0
    headway_s: float = 0.5
    tlc_s: float = 1.0
    vehicle_width_m: float = 2.0

    def __post_init__(self) -> None:
        for name in ("ttc_s", "headway_s", "tlc_s", "vehicle_width_m"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"hazard criterion {name} must be > 0, got {value}")


def longitudinal_hazard(snap: WorldSnapshot, c: HazardCriteria) -> str | None:
    """What makes the lead a hazard (TTC or headway below the criterion), None when nothing does."""
    ttc = ttc_s(snap)
    if ttc < c.ttc_s:
        return f"true TTC {ttc:.2f} s < {c.ttc_s:g} s"
    gap = gap_m(snap)
    if snap.speed_mps > 0 and math.isfinite(gap) and gap / snap.speed_mps < c.headway_s:
        return f"true headway {gap / snap.speed_mps:.2f} s < {c.headway_s:g} s"
    return None


def lateral_hazard(snap: WorldSnapshot, c: HazardCriteria) -> str | None:
    """Over the lane marking, or reaching it within ``tlc_s`` at the current lateral speed; else None."""
    margin = snap.lane_width_m / 2 - c.vehicle_width_m / 2 - abs(snap.lane_offset_m)
    if margin <= 0:
        return f"over the lane marking by {-margin:.2f} m"
    lateral = snap.speed_mps * math.sin(snap.heading_rel_rad)  # + left, like lane_offset_m
    outward = lateral * snap.lane_offset_m > 0 or (snap.lane_offset_m == 0 and lateral != 0)
    if outward and margin / abs(lateral) < c.tlc_s:
        return f"true time to line crossing {margin / abs(lateral):.2f} s < {c.tlc_s:g} s"
    return None


def judge_activation(kind: str, snap: WorldSnapshot | None, c: HazardCriteria) -> tuple[bool, str]:
    """(justified, why) for one activation of rule ``kind`` (aeb, lane, watchdog, …) on the state it saw."""
    if kind == "watchdog":
        return True, "the model failed (watchdog)"
    if snap is None:
        return False, "no ground truth recorded for this tick"
    hazard = {"aeb": longitudinal_hazard, "lane": lateral_hazard}.get(kind)
    why = hazard(snap, c) if hazard is not None else None
    return (True, why) if why is not None else (False, f"no {kind} hazard in the ground truth")
