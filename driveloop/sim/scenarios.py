"""The scenario catalog: every drive the fleet, the safety suite and the evaluation gate can ask for.

A scenario is a *name* (what a person types, what a segment records) that parses into a frozen
:class:`ScenarioSpec`; the simulator builds the scene from the spec and a seed, so a name plus a seed
replays a drive exactly.

Names (``scenario_names()`` lists every concrete one):

- ``highway``  nominal cruise, 4 lanes, light traffic.
- ``dense``    nominal dense traffic, 3 lanes, slower and closer.
- ``cut-in``   a vehicle from the adjacent lane cuts in ahead of the ego: tight, avoidable by braking.
- ``merge``    a vehicle merges from an on-ramp into the ego lane ahead of the ego.
- Car-to-car rear, two vehicles, one lane of interest, any physically valid parameters:
  ``ccrs-<kmh>`` stationary target, ego ``CCR_EGO_KMH`` (5..130 km/h);
  ``ccrm-<kmh>`` target moving at 20 km/h, ego 5..130 km/h;
  ``ccrb-<headway_m>-<decel>`` both at 50 km/h, headway 5..100 m, target brakes at 1..10 m/s².
  The 30 Euro NCAP cases (``CCR_CASES``) are the grid the safety suite runs by default: ccrs 10..80 km/h
  step 5 (15), ccrm 30..80 km/h step 5 (11), ccrb headway 12 or 40 m × 2 or 6 m/s² (4).
- ``cutin-<gap_m>-<dv_kmh>-<lat_mps>`` the parametric cut-in (``CUTIN_CASES`` is the suite's grid): the ego
  at ``CUTIN_EGO_KMH`` on a road without traffic; a car in the next lane, ``dv_kmh`` slower, moves sideways
  at ``lat_mps`` into the ego's lane and its body crosses the lane marking ``gap_m`` (bumper to bumper)
  ahead of the ego (see :func:`cut_in_plan`; ``sim.truth.cut_in_truth`` judges whether it was avoidable).
- ``mix`` is not a scenario but a distribution (:func:`draw_mix`): each vehicle draws its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from driveloop.core.exceptions import ScenarioError

KMH = 1 / 3.6  # km/h → m/s

KINDS = ("highway", "dense", "cut-in", "merge", "ccrs", "ccrm", "ccrb", "cutin")
NOMINAL_KINDS = ("highway", "dense")
MIX = "mix"
# The safety suite's case families: which scenario kinds belong to each (``--family``).
FAMILIES: dict[str, tuple[str, ...]] = {"ccr": ("ccrs", "ccrm", "ccrb"), "cut-in": ("cutin",)}

CCRS_SPEEDS_KMH = tuple(range(10, 85, 5))
CCRM_SPEEDS_KMH = tuple(range(30, 85, 5))
CCRM_TARGET_KMH = 20
CCRB_SPEED_KMH = 50
CCRB_HEADWAYS_M = (12, 40)
CCRB_DECELS_MPS2 = (2, 6)
# Euro NCAP starts a CCR run at a time-to-collision of 4 s (CCRs/CCRm); never closer than this.
CCR_START_TTC_S = 4.0
CCR_MIN_START_GAP_M = 10.0
# Physically valid CCR parameters (inclusive): a parametric name outside them is refused, naming the range.
CCR_EGO_KMH = (5.0, 130.0)
CCRB_HEADWAY_RANGE_M = (5.0, 100.0)
CCRB_DECEL_RANGE_MPS2 = (1.0, 10.0)

# The parametric cut-in: ego speed, the ranges a name may ask for, and the geometry of the manoeuvre.
CUTIN_EGO_KMH = 90.0
CUTIN_GAP_RANGE_M = (0.0, 50.0)
CUTIN_DV_RANGE_KMH = (0.0, 80.0)
CUTIN_LATERAL_RANGE_MPS = (0.2, 3.0)
CUTIN_START_S = 1.0  # the cutting car starts moving sideways this long after the start
# It starts this much of a sideways step further out, so its side crosses the marking half a control period
# after a tick: no frame sees it exactly on the line (where float rounding, not the car, would decide).
CUTIN_PHASE_S = 0.05
LANE_WIDTH_M = 4.0  # highway-env's straight lanes
VEHICLE_LENGTH_M = 5.0
VEHICLE_WIDTH_M = 2.0
# The suite's cut-in grid: gap at the marking crossing × relative speed × lateral speed, every combination
# that is a cut-in ahead (``cut_in_ahead``).
CUTIN_GAPS_M = (3, 6, 10, 15, 20)
CUTIN_DVS_KMH = (10, 20, 30, 40, 50)
CUTIN_LATERALS_MPS = (0.5, 1, 2)

_NUM = r"(\d+(?:\.\d+)?)"
_CCRS_RE = re.compile(rf"^ccrs-{_NUM}$")
_CCRM_RE = re.compile(rf"^ccrm-{_NUM}$")
_CCRB_RE = re.compile(rf"^ccrb-{_NUM}-{_NUM}$")
_CUTIN_RE = re.compile(rf"^cutin-{_NUM}-{_NUM}-{_NUM}$")


@dataclass(frozen=True)
class ScenarioSpec:
    """What a scene contains; the seed decides the rest (traffic placement, small jitters).

    ``target_*`` fields describe the scenario's subject vehicle (CCR target, cut-in/merge vehicle);
    ``traffic_vehicles`` counts the IDM/MOBIL background traffic; ``hazard`` marks scenes built around
    a critical event (for the data mix and the evaluation gate).
    """

    name: str
    kind: str
    ego_speed_mps: float
    set_speed_mps: float
    target_speed_mps: float
    headway_m: float
    target_decel_mps2: float
    traffic_vehicles: int
    lanes: int
    duration_s: float
    hazard: bool
    lateral_speed_mps: float = 0.0  # the cut-in subject's sideways speed (parametric cut-in only)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScenarioError(f"unknown scenario kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if not 0 <= self.ego_speed_mps <= 40 or not 0 < self.set_speed_mps <= 40:
            raise ScenarioError(f"{self.name}: ego speed out of 0..40 m/s")
        if not 0 <= self.target_speed_mps <= 40:
            raise ScenarioError(f"{self.name}: target speed out of 0..40 m/s")
        if self.headway_m < 0 or self.target_decel_mps2 < 0 or self.lateral_speed_mps < 0:
            raise ScenarioError(f"{self.name}: headway, decel and lateral speed must be >= 0")
        if self.traffic_vehicles < 0 or not 1 <= self.lanes <= 5:
            raise ScenarioError(f"{self.name}: bad traffic count or lane count")
        if self.duration_s <= 0:
            raise ScenarioError(f"{self.name}: duration must be > 0")

    @property
    def is_ccr(self) -> bool:
        return self.kind in FAMILIES["ccr"]

    @property
    def family(self) -> str | None:
        """The safety-suite family this scenario belongs to (``FAMILIES``), None for the others."""
        return next((name for name, kinds in FAMILIES.items() if self.kind in kinds), None)


def _ccr_names() -> tuple[str, ...]:
    names = [f"ccrs-{v}" for v in CCRS_SPEEDS_KMH]
    names += [f"ccrm-{v}" for v in CCRM_SPEEDS_KMH]
    names += [f"ccrb-{h}-{d}" for h in CCRB_HEADWAYS_M for d in CCRB_DECELS_MPS2]
    return tuple(names)


def _num(value: float) -> str:
    """A parameter as it is written in a canonical name: 12, 2.5 (never 12.0)."""
    return f"{value:g}"


def cut_in_ahead(gap_m: float, dv_kmh: float, lateral_mps: float) -> bool:
    """Does the car cut in *ahead*? True unless an ego holding its speed has passed it completely by the time
    its side reaches the ego's path (then it merges in behind: braking is no remedy, nor needed)."""
    to_path_m = VEHICLE_WIDTH_M / 2  # sideways from the marking to the ego's side (a 2 m ego centred in its lane)
    return gap_m - dv_kmh * KMH * to_path_m / lateral_mps > -2 * VEHICLE_LENGTH_M


CCR_CASES: tuple[str, ...] = _ccr_names()
CUTIN_CASES: tuple[str, ...] = tuple(f"cutin-{g}-{dv}-{_num(lat)}" for g in CUTIN_GAPS_M for dv in CUTIN_DVS_KMH
                                     for lat in CUTIN_LATERALS_MPS if cut_in_ahead(g, dv, lat))
FAMILY_CASES: dict[str, tuple[str, ...]] = {"ccr": CCR_CASES, "cut-in": CUTIN_CASES}
BASE_NAMES: tuple[str, ...] = ("highway", "dense", "cut-in", "merge")


def scenario_names() -> tuple[str, ...]:
    """Every concrete scenario name (not ``mix``), nominal first."""
    return BASE_NAMES + CCR_CASES


def _range(bounds: tuple[float, float], unit: str) -> str:
    return f"{_num(bounds[0])}..{_num(bounds[1])} {unit}"


def _unknown(name: str) -> ScenarioError:
    return ScenarioError(
        f"unknown scenario {name!r}; valid: highway, dense, cut-in, merge, mix, "
        f"ccrs-<{_range(CCR_EGO_KMH, 'km/h')}>, ccrm-<{_range(CCR_EGO_KMH, 'km/h')}>, "
        f"ccrb-<{_range(CCRB_HEADWAY_RANGE_M, 'm')}>-<{_range(CCRB_DECEL_RANGE_MPS2, 'm/s2')}>, "
        f"cutin-<{_range(CUTIN_GAP_RANGE_M, 'm')}>-<{_range(CUTIN_DV_RANGE_KMH, 'km/h')}>-"
        f"<{_range(CUTIN_LATERAL_RANGE_MPS, 'm/s')}>"
    )


def _within(name: str, what: str, value: float, bounds: tuple[float, float], unit: str) -> float:
    """``value`` when inside ``bounds`` (inclusive); else a one-line ScenarioError naming the range."""
    if not bounds[0] <= value <= bounds[1]:
        raise ScenarioError(f"scenario {name!r}: {what} {_num(value)} {unit} is outside {_range(bounds, unit)}")
    return value


def _ccr_duration_s(gap_m: float, closing_mps: float) -> float:
    # Time to close the gap at the initial speeds plus time to stop/settle afterwards.
    return round(gap_m / max(closing_mps, 1.0) + 6.0, 1)


def ccr_start_gap_m(ego_speed_mps: float, target_speed_mps: float) -> float:
    """Nominal bumper gap at the start of a CCRs/CCRm run: TTC 4 s, at least 10 m."""
    return max(CCR_START_TTC_S * (ego_speed_mps - target_speed_mps), CCR_MIN_START_GAP_M)


def _nominal(name: str) -> ScenarioSpec:
    table = {
        "highway": {"ego": 25.0, "set_": 28.0, "target": 25.0, "traffic": 8, "lanes": 4, "hazard": False, "headway": 0.0},
        "dense": {"ego": 18.0, "set_": 22.0, "target": 18.0, "traffic": 14, "lanes": 3, "hazard": False, "headway": 0.0},
        # cut-in / merge: the subject vehicle ends up ~12–25 m ahead, 2–5 m/s slower (seeded).
        "cut-in": {"ego": 25.0, "set_": 25.0, "target": 21.0, "traffic": 4, "lanes": 3, "hazard": True, "headway": 18.0},
        "merge": {"ego": 25.0, "set_": 25.0, "target": 22.0, "traffic": 3, "lanes": 2, "hazard": True, "headway": 20.0},
    }
    row = table[name]
    duration = 60.0 if name in NOMINAL_KINDS else 20.0
    return ScenarioSpec(
        name=name,
        kind=name,
        ego_speed_mps=float(row["ego"]),
        set_speed_mps=float(row["set_"]),
        target_speed_mps=float(row["target"]),
        headway_m=float(row["headway"]),
        target_decel_mps2=0.0,
        traffic_vehicles=int(row["traffic"]),
        lanes=int(row["lanes"]),
        duration_s=duration,
        hazard=bool(row["hazard"]),
    )


def _ccr(name: str, kind: str, ego_kmh: float, target_kmh: float, headway: float | None, decel: float) -> ScenarioSpec:
    ego, target = ego_kmh * KMH, target_kmh * KMH
    gap = headway if headway is not None else ccr_start_gap_m(ego, target)
    closing = ego - target if kind != "ccrb" else 3.0  # CCRb closes once the target brakes
    return ScenarioSpec(
        name=name,
        kind=kind,
        ego_speed_mps=ego,
        set_speed_mps=ego,
        target_speed_mps=target,
        headway_m=float(gap),
        target_decel_mps2=float(decel),
        traffic_vehicles=0,
        lanes=3,
        duration_s=_ccr_duration_s(gap, closing),
        hazard=True,
    )


@dataclass(frozen=True)
class CutInPlan:
    """Where and when a parametric cut-in happens, on its own clock (t = 0 at the start), ego holding speed.

    The cutting car starts ``start_offset_m`` beside the ego lane's centre and moves in from ``start_s``;
    ``start_gap_m`` is the bumper gap at t = 0 that makes the gap ``crossing_gap_m`` at ``crossing_s``, when its
    near side crosses the lane marking (its centre ``crossing_offset_m`` from the ego lane's centre).
    """

    ego_speed_mps: float
    cutter_speed_mps: float
    lateral_speed_mps: float
    start_s: float
    start_offset_m: float
    crossing_s: float
    crossing_gap_m: float
    start_gap_m: float
    crossing_offset_m: float


def cut_in_plan(spec: ScenarioSpec) -> CutInPlan:
    """The manoeuvre of a parametric cut-in spec (scene builder and tests share this one definition)."""
    if spec.kind != "cutin":
        raise ScenarioError(f"{spec.name} is not a parametric cut-in")
    crossing_offset = LANE_WIDTH_M / 2 + VEHICLE_WIDTH_M / 2  # its centre when its side is on the marking
    start_offset = LANE_WIDTH_M + spec.lateral_speed_mps * CUTIN_PHASE_S
    crossing_s = CUTIN_START_S + (start_offset - crossing_offset) / spec.lateral_speed_mps
    closing = spec.ego_speed_mps - spec.target_speed_mps
    return CutInPlan(spec.ego_speed_mps, spec.target_speed_mps, spec.lateral_speed_mps, CUTIN_START_S, start_offset,
                     crossing_s, spec.headway_m, spec.headway_m + closing * crossing_s, crossing_offset)


def _cut_in(name: str, gap_m: float, dv_kmh: float, lateral_mps: float) -> ScenarioSpec:
    _within(name, "gap", gap_m, CUTIN_GAP_RANGE_M, "m")
    _within(name, "relative speed", dv_kmh, CUTIN_DV_RANGE_KMH, "km/h")
    _within(name, "lateral speed", lateral_mps, CUTIN_LATERAL_RANGE_MPS, "m/s")
    if not cut_in_ahead(gap_m, dv_kmh, lateral_mps):
        raise ScenarioError(f"scenario {name!r} is no cut-in ahead: the ego would have passed the car before it "
                            f"reaches the ego's path (larger gap or lateral speed, or smaller relative speed)")
    ego = CUTIN_EGO_KMH * KMH
    to_crossing_s = CUTIN_START_S + CUTIN_PHASE_S + (LANE_WIDTH_M / 2 - VEHICLE_WIDTH_M / 2) / lateral_mps
    return ScenarioSpec(
        name=name, kind="cutin", ego_speed_mps=ego, set_speed_mps=ego, target_speed_mps=ego - dv_kmh * KMH,
        headway_m=gap_m, target_decel_mps2=0.0, traffic_vehicles=0, lanes=3,
        duration_s=round(to_crossing_s + 6.0, 1), hazard=True, lateral_speed_mps=lateral_mps,
    )


def _parse_ccrs(key: str, m: re.Match[str]) -> ScenarioSpec:
    return _ccr(key, "ccrs", _within(key, "ego speed", float(m.group(1)), CCR_EGO_KMH, "km/h"), 0, None, 0.0)


def _parse_ccrm(key: str, m: re.Match[str]) -> ScenarioSpec:
    kmh = _within(key, "ego speed", float(m.group(1)), CCR_EGO_KMH, "km/h")
    return _ccr(key, "ccrm", kmh, CCRM_TARGET_KMH, None, 0.0)


def _parse_ccrb(key: str, m: re.Match[str]) -> ScenarioSpec:
    headway = _within(key, "headway", float(m.group(1)), CCRB_HEADWAY_RANGE_M, "m")
    decel = _within(key, "target deceleration", float(m.group(2)), CCRB_DECEL_RANGE_MPS2, "m/s2")
    return _ccr(key, "ccrb", CCRB_SPEED_KMH, CCRB_SPEED_KMH, headway, decel)


def _parse_cutin(key: str, m: re.Match[str]) -> ScenarioSpec:
    return _cut_in(key, float(m.group(1)), float(m.group(2)), float(m.group(3)))


# Parametric names: pattern -> builder, tried in order (a table, not a chain).
_PARAMETRIC = ((_CCRS_RE, _parse_ccrs), (_CCRM_RE, _parse_ccrm), (_CCRB_RE, _parse_ccrb), (_CUTIN_RE, _parse_cutin))


def _canonical(key: str) -> str:
    """``ccrb-12.0-6`` → ``ccrb-12-6``: one name per scenario, whatever the spelling of its numbers."""
    head, *numbers = key.split("-")
    return "-".join([head, *(_num(float(n)) for n in numbers)])


def parse_scenario(name: str) -> ScenarioSpec:
    """The spec for a concrete scenario name; ScenarioError (listing the valid names, or naming the range a
    parameter is outside) otherwise."""
    if not isinstance(name, str):
        raise _unknown(repr(name))
    key = name.strip().lower()
    if key in BASE_NAMES:
        return _nominal(key)
    if key == MIX:
        raise ScenarioError("'mix' is a distribution, not a scenario: draw one per vehicle with draw_mix()")
    for pattern, build in _PARAMETRIC:
        if pattern.match(key):
            canonical = _canonical(key)
            return build(canonical, pattern.match(canonical))  # type: ignore[arg-type]
    raise _unknown(name)


def validate_scenario_name(name: str) -> str:
    """Normalised name if it is a concrete scenario or ``mix`` (for CLI flags); ScenarioError otherwise."""
    key = name.strip().lower() if isinstance(name, str) else ""
    if key == MIX:
        return key
    return parse_scenario(name).name


# The fleet mix: mostly nominal driving, some interactive hazards, a sprinkle of CCR cases.
MIX_WEIGHTS: dict[str, float] = {"highway": 0.40, "dense": 0.25, "cut-in": 0.10, "merge": 0.10, "ccr": 0.15}


def draw_mix(rng: np.random.Generator) -> str:
    """One scenario name drawn from the weighted fleet mix (CCR cases uniform within their share)."""
    keys = list(MIX_WEIGHTS)
    weights = np.array([MIX_WEIGHTS[k] for k in keys])
    pick = keys[int(rng.choice(len(keys), p=weights / weights.sum()))]
    if pick == "ccr":
        return CCR_CASES[int(rng.integers(len(CCR_CASES)))]
    return pick


def resolve_scenarios(name: str, count: int, rng: np.random.Generator) -> list[ScenarioSpec]:
    """Specs for ``count`` vehicles: the named scenario for all, or one draw each for ``mix``."""
    key = validate_scenario_name(name)
    if key == MIX:
        return [parse_scenario(draw_mix(rng)) for _ in range(count)]
    spec = parse_scenario(key)
    return [spec] * count
