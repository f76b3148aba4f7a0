"""Road-hazard advisories: a hazard pushed from the cloud may only make the vehicle more careful.

An :class:`Advisory` is what the vehicle's hazard filter (``edge/hazards.py``) distils from the verified
hazards ahead of it: the hazard lies ``distance_m`` ahead; be at most at ``speed_mps`` by then, and/or keep at
least ``time_gap_s`` to the lead. :func:`accel_cap_mps2` turns it into an upper bound on the commanded
acceleration, and the supervisor takes ``min(request, cap)`` before the actuator limits. Rules:

- The cap only ever *lowers* a request (a min), and the limits are monotone in the request, so a command with
  an advisory is never above the command without it (property-tested). AEB, watchdog, lane guard, hand-back
  and the limits run unchanged: an advisory cannot relax any of them, nor raise a brake command.
- Speed: the allowed speed ``d`` m before the hazard is ``sqrt(v_adv^2 + 2 * plan_decel * d)``, a constant
  comfortable slow-down that reaches the advised speed at the hazard; the cap is ``speed_gain`` x (allowed -
  ego speed), so far from the hazard it is loose and close to it the vehicle follows the envelope down.
- Time gap: with a lead, a constant-time-gap law ``gap_gain x (gap - (standstill + time_gap x v)) +
  gap_speed_gain x (lead speed - v)``; without a lead, no gap cap.
- Neither cap asks for more than ``max_decel_mps2`` (comfort): an advisory slows the vehicle as a careful
  driver would, without emergency jerk; a hazard that needs more is the AEB's, as it was without the advisory.
"""

from __future__ import annotations

import math

from .config import AdvisoryConfig
from .types import Advisory, Track

__all__ = ["NO_CAP_MPS2", "Advisory", "accel_cap_mps2", "allowed_speed_mps", "gap_cap_mps2", "speed_cap_mps2"]

NO_CAP_MPS2 = math.inf  # an advisory that does not bind (no lead for a gap-only advisory)


def allowed_speed_mps(advisory_speed_mps: float, distance_m: float, config: AdvisoryConfig) -> float:
    """The highest speed ``distance_m`` before the hazard from which ``plan_decel_mps2`` still reaches the
    advised speed at the hazard."""
    return math.sqrt(advisory_speed_mps * advisory_speed_mps + 2.0 * config.plan_decel_mps2 * distance_m)


def speed_cap_mps2(advisory_speed_mps: float, distance_m: float, ego_speed_mps: float,
                   config: AdvisoryConfig) -> float:
    """Acceleration cap that follows the allowed-speed envelope down to the advised speed (>= -max decel)."""
    allowed = allowed_speed_mps(advisory_speed_mps, distance_m, config)
    return max(config.speed_gain_per_s * (allowed - ego_speed_mps), -config.max_decel_mps2)


def gap_cap_mps2(time_gap_s: float, ego_speed_mps: float, track: Track | None, config: AdvisoryConfig) -> float:
    """Acceleration cap of the constant-time-gap law to the lead (>= -max decel); no cap without a lead."""
    if track is None:
        return NO_CAP_MPS2
    wanted = config.standstill_gap_m + time_gap_s * max(ego_speed_mps, 0.0)
    law = (config.gap_gain_per_s2 * (float(track.gap_m) - wanted)
           + config.gap_speed_gain_per_s * (float(track.lead_speed_mps) - ego_speed_mps))
    return max(law, -config.max_decel_mps2)


def accel_cap_mps2(advisory: Advisory, ego_speed_mps: float, track: Track | None, config: AdvisoryConfig) -> float:
    """The tighter of the speed and the time-gap caps the advisory asks for (``NO_CAP_MPS2`` if neither binds)."""
    cap = NO_CAP_MPS2
    if advisory.speed_mps is not None:
        cap = speed_cap_mps2(advisory.speed_mps, advisory.distance_m, ego_speed_mps, config)
    if advisory.time_gap_s is not None:
        cap = min(cap, gap_cap_mps2(advisory.time_gap_s, ego_speed_mps, track, config))
    return cap
