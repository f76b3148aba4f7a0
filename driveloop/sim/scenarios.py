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
- Environments the bootstrap model never saw (``ENVIRONMENTS``; each its own class in the gate), parametric
  and seeded, the bare name being the default parameters (``ENVIRONMENT_DEFAULTS``):
  ``construction-<gap_m>-<dv_kmh>`` the next lane closes (a row of stopped vehicles); its traffic merges into
  the ego's lane ``gap_m`` ahead, ``dv_kmh`` slower, one car after the other;
  ``fog-<visibility_m>`` slower traffic ahead, seen only within ``visibility_m`` (20..200 m), with sensor noise
  and dropout (:func:`fog_sensor_degradation`);
  ``slippery-<friction>`` a lead that brakes on a road of friction coefficient 0.2..1 (braking limited to
  friction x g for everybody);
  ``aggressive-<gap_m>-<dv_kmh>`` cut-ins at shorter gaps and higher relative speeds than ``cut-in``.
- Road hazards for a fleet (``SHARED_ROAD_KINDS``: every vehicle of a fleet drives the same road coordinates):
  ``jam-tail[-<back_m>]`` stopped traffic across all lanes ``JAM_TAIL_X_M`` down the road, far beyond sensor
  range, approached at 108 km/h from ``JAM_APPROACH_M`` + ``back_m`` (0..5000 m) before it, so the fleet's
  vehicle i (``jam_tail_name``) starts further back and meets the jam after the ones ahead of it;
  ``jam-tail-fog[-<back_m>]`` the same at 80 km/h in fog (sensors see ``JAM_FOG_VISIBILITY_M``).
- ``mix+<environment>`` is the fleet mix with that environment added (:func:`mix_weights`): the world after a
  shift.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from driveloop.core.exceptions import ScenarioError
from driveloop.safety.aeb import GRAVITY_MPS2

KMH = 1 / 3.6  # km/h → m/s

ENVIRONMENTS = ("construction", "fog", "slippery", "aggressive")
SHARED_ROAD_KINDS = ("jam-tail",)  # scenes laid out on one road for the whole fleet (road hazards)
KINDS = ("highway", "dense", "cut-in", "merge", "ccrs", "ccrm", "ccrb", "cutin", *ENVIRONMENTS, *SHARED_ROAD_KINDS)
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

# The environments: parameter ranges a name may ask for, and the defaults a bare name stands for.
CONSTRUCTION_GAP_RANGE_M = (5.0, 40.0)
CONSTRUCTION_DV_RANGE_KMH = (0.0, 60.0)
FOG_VISIBILITY_RANGE_M = (20.0, 200.0)
FRICTION_RANGE = (0.2, 1.0)
AGGRESSIVE_GAP_RANGE_M = (5.0, 40.0)
AGGRESSIVE_DV_RANGE_KMH = (0.0, 60.0)
# fog-25: at 40 m the slower traffic appears early enough for the familiar model's following (v2: 15
# interventions/h, no shift to adapt to); at 25 m it closes on a car it sees ~2.5 s before contact (v2: 60/h,
# fog-20: 90/h; 6 vehicles x 40 s each, seeds 5000+), while the expert on ground truth never collides.
ENVIRONMENT_DEFAULTS: dict[str, str] = {
    "construction": "construction-12-20", "fog": "fog-25", "slippery": "slippery-0.4", "aggressive": "aggressive-9-25",
}
# Fog's sensor degradation besides the range cut: noise (x the units of sim.sensors) and frame dropout. Dropout
# stays small: three lost frames in a row is stale input, which the watchdog must answer with the fallback.
FOG_NOISE_SIGMA = 0.3
FOG_DROPOUT_P = 0.02

_NUM = r"(\d+(?:\.\d+)?)"
_CCRS_RE = re.compile(rf"^ccrs-{_NUM}$")
_CCRM_RE = re.compile(rf"^ccrm-{_NUM}$")
_CCRB_RE = re.compile(rf"^ccrb-{_NUM}-{_NUM}$")
_CUTIN_RE = re.compile(rf"^cutin-{_NUM}-{_NUM}-{_NUM}$")
_CONSTRUCTION_RE = re.compile(rf"^construction-{_NUM}-{_NUM}$")
_FOG_RE = re.compile(rf"^fog-{_NUM}$")
_SLIPPERY_RE = re.compile(rf"^slippery-{_NUM}$")
_AGGRESSIVE_RE = re.compile(rf"^aggressive-{_NUM}-{_NUM}$")


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
    friction_mu: float = 1.0  # road friction coefficient: braking is limited to friction_mu x g (slippery)
    visibility_m: float = math.inf  # how far the sensors see (fog)

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
        if not FRICTION_RANGE[0] <= self.friction_mu <= FRICTION_RANGE[1]:
            raise ScenarioError(f"{self.name}: friction {self.friction_mu} outside {_range(FRICTION_RANGE, '')}")
        if not self.visibility_m > 0:
            raise ScenarioError(f"{self.name}: visibility must be > 0 m")

    @property
    def max_decel_mps2(self) -> float:
        """The deceleration the road allows (friction x g)."""
        return self.friction_mu * GRAVITY_MPS2

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
    return f"{_num(bounds[0])}..{_num(bounds[1])}" + (f" {unit}" if unit else "")


def _unknown(name: str) -> ScenarioError:
    return ScenarioError(
        f"unknown scenario {name!r}; valid: highway, dense, cut-in, merge, mix, "
        f"ccrs-<{_range(CCR_EGO_KMH, 'km/h')}>, ccrm-<{_range(CCR_EGO_KMH, 'km/h')}>, "
        f"ccrb-<{_range(CCRB_HEADWAY_RANGE_M, 'm')}>-<{_range(CCRB_DECEL_RANGE_MPS2, 'm/s2')}>, "
        f"cutin-<{_range(CUTIN_GAP_RANGE_M, 'm')}>-<{_range(CUTIN_DV_RANGE_KMH, 'km/h')}>-"
        f"<{_range(CUTIN_LATERAL_RANGE_MPS, 'm/s')}>, "
        f"construction[-<{_range(CONSTRUCTION_GAP_RANGE_M, 'm')}>-<{_range(CONSTRUCTION_DV_RANGE_KMH, 'km/h')}>], "
        f"fog[-<{_range(FOG_VISIBILITY_RANGE_M, 'm')}>], slippery[-<friction {_range(FRICTION_RANGE, '')}>], "
        f"aggressive[-<{_range(AGGRESSIVE_GAP_RANGE_M, 'm')}>-<{_range(AGGRESSIVE_DV_RANGE_KMH, 'km/h')}>], "
        f"jam-tail[-fog][-<{_range(JAM_BACK_RANGE_M, 'm')}>], mix+<{'|'.join(ENVIRONMENTS)}>"
    )


def _within(name: str, what: str, value: float, bounds: tuple[float, float], unit: str) -> float:
    """``value`` when inside ``bounds`` (inclusive); else a one-line ScenarioError naming the range."""
    if not bounds[0] <= value <= bounds[1]:
        shown = f"{_num(value)} {unit}" if unit else _num(value)
        raise ScenarioError(f"scenario {name!r}: {what} {shown} is outside {_range(bounds, unit)}")
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


# -- the environments -----------------------------------------------------------------------------------
def _parse_construction(key: str, m: re.Match[str]) -> ScenarioSpec:
    """A work zone at 80 km/h: the next lane is closed by stopped vehicles; the three cars in it, a queue slowing
    into the work zone (car k ``dv_kmh`` x (1 + 0.5 k) slower than the ego's set speed), merge into the ego's lane
    ``gap_m`` (seeded jitter) ahead of it, one after the other, each into a free gap only (``sim._scenes``)."""
    gap = _within(key, "merge gap", float(m.group(1)), CONSTRUCTION_GAP_RANGE_M, "m")
    dv = _within(key, "relative speed", float(m.group(2)), CONSTRUCTION_DV_RANGE_KMH, "km/h")
    ego = 80 * KMH
    return ScenarioSpec(name=key, kind="construction", ego_speed_mps=ego, set_speed_mps=ego,
                        target_speed_mps=max(ego - dv * KMH, 0.0), headway_m=gap, target_decel_mps2=0.0,
                        traffic_vehicles=3, lanes=2, duration_s=30.0, hazard=True)


def _parse_fog(key: str, m: re.Match[str]) -> ScenarioSpec:
    """Dense, slower traffic (the ego's set speed 90 km/h, traffic ~55 km/h) seen only within ``visibility_m``."""
    visibility = _within(key, "visibility", float(m.group(1)), FOG_VISIBILITY_RANGE_M, "m")
    return ScenarioSpec(name=key, kind="fog", ego_speed_mps=22.0, set_speed_mps=25.0, target_speed_mps=15.0,
                        headway_m=0.0, target_decel_mps2=0.0, traffic_vehicles=10, lanes=3, duration_s=40.0,
                        hazard=True, visibility_m=visibility)


def _parse_slippery(key: str, m: re.Match[str]) -> ScenarioSpec:
    """A lead 1.5 s ahead at 72 km/h brakes to a stop at 80 % of what the road allows (friction x g)."""
    mu = _within(key, "friction", float(m.group(1)), FRICTION_RANGE, "")
    speed = 20.0
    return ScenarioSpec(name=key, kind="slippery", ego_speed_mps=speed, set_speed_mps=speed, target_speed_mps=speed,
                        headway_m=1.5 * speed, target_decel_mps2=round(0.8 * mu * GRAVITY_MPS2, 3),
                        traffic_vehicles=4, lanes=3, duration_s=20.0, hazard=True, friction_mu=mu)


def _parse_aggressive(key: str, m: re.Match[str]) -> ScenarioSpec:
    """The ``cut-in`` scene with a closer, faster-closing cutter: ``gap_m`` ahead, ``dv_kmh`` slower (jittered)."""
    gap = _within(key, "gap", float(m.group(1)), AGGRESSIVE_GAP_RANGE_M, "m")
    dv = _within(key, "relative speed", float(m.group(2)), AGGRESSIVE_DV_RANGE_KMH, "km/h")
    ego = 25.0
    return ScenarioSpec(name=key, kind="aggressive", ego_speed_mps=ego, set_speed_mps=ego,
                        target_speed_mps=max(ego - dv * KMH, 0.0), headway_m=gap, target_decel_mps2=0.0,
                        traffic_vehicles=4, lanes=3, duration_s=20.0, hazard=True)


def fog_sensor_degradation(spec: ScenarioSpec) -> tuple[float, float, float]:
    """(visibility_m, noise sigma, dropout probability) the scenario imposes on every sensor; a clear scene
    imposes nothing (inf, 0, 0)."""
    if math.isinf(spec.visibility_m):
        return math.inf, 0.0, 0.0
    return spec.visibility_m, FOG_NOISE_SIGMA, FOG_DROPOUT_P


# -- the jam tail (road hazards for a fleet) ----------------------------------------------------------
JAM_TAIL_X_M = 6000.0  # where the jam's last cars stand (rear bumper), the same in every vehicle's world
JAM_APPROACH_M = 800.0  # ``jam-tail``'s ego starts this far before it (bumper gap): 8x the sensors' range
JAM_BACK_RANGE_M = (0.0, 5000.0)  # how much further back ``jam-tail-<back_m>`` starts
JAM_EGO_KMH = 108.0
JAM_FOG_EGO_KMH = 80.0  # in fog traffic is slower already; the AEB alone still stops within the visibility
JAM_FOG_VISIBILITY_M = 70.0  # below the sensors' 100 m: comfortable braking from 80 km/h needs more
JAM_SETTLE_S = 60.0  # beyond reaching the tail at its speed: time to slow down (advised), stop and stand
JAM_FLEET_SPACING_M = 400.0  # vehicle i of a fleet starts i x this further back (``jam_tail_name``)
_JAM_RE = re.compile(rf"^jam-tail(-fog)?(?:-{_NUM})?$")


def _parse_jam(key: str) -> ScenarioSpec | None:
    """The jam-tail spec a name asks for, or None when it is no jam-tail name (``headway_m``: the bumper gap
    from the ego's start to the jam's tail)."""
    m = _JAM_RE.match(key)
    if m is None:
        return None
    fog = m.group(1) is not None
    back = _within(key, "start further back", float(m.group(2) or 0.0), JAM_BACK_RANGE_M, "m")
    ego = (JAM_FOG_EGO_KMH if fog else JAM_EGO_KMH) * KMH
    gap = JAM_APPROACH_M + back
    name = "jam-tail" + ("-fog" if fog else "") + (f"-{_num(back)}" if back else "")
    return ScenarioSpec(name=name, kind="jam-tail", ego_speed_mps=ego, set_speed_mps=ego, target_speed_mps=0.0,
                        headway_m=gap, target_decel_mps2=0.0, traffic_vehicles=0, lanes=3,
                        duration_s=round(gap / ego + JAM_SETTLE_S, 1), hazard=True,
                        visibility_m=JAM_FOG_VISIBILITY_M if fog else math.inf)


def jam_tail_name(name: str, index: int) -> str:
    """Vehicle ``index``'s scenario in a fleet driving jam-tail ``name``: ``JAM_FLEET_SPACING_M`` further back
    per index, so vehicle 0 meets the jam first and the ones behind can be told; other names unchanged."""
    spec = _parse_jam(name.strip().lower()) if isinstance(name, str) else None
    if spec is None or index == 0:
        return name
    fog = "-fog" if math.isfinite(spec.visibility_m) else ""
    back = spec.headway_m - JAM_APPROACH_M + index * JAM_FLEET_SPACING_M
    return f"jam-tail{fog}-{_num(back)}"


# Parametric names: pattern -> builder, tried in order (a table, not a chain).
_PARAMETRIC = ((_CCRS_RE, _parse_ccrs), (_CCRM_RE, _parse_ccrm), (_CCRB_RE, _parse_ccrb), (_CUTIN_RE, _parse_cutin),
               (_CONSTRUCTION_RE, _parse_construction), (_FOG_RE, _parse_fog), (_SLIPPERY_RE, _parse_slippery),
               (_AGGRESSIVE_RE, _parse_aggressive))


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
    if is_mix(key):
        raise ScenarioError(f"{key!r} is a distribution, not a scenario: draw one per vehicle with draw_mix()")
    jam = _parse_jam(key)
    if jam is not None:
        return jam
    key = ENVIRONMENT_DEFAULTS.get(key, key)
    for pattern, build in _PARAMETRIC:
        if pattern.match(key):
            canonical = _canonical(key)
            return build(canonical, pattern.match(canonical))  # type: ignore[arg-type]
    raise _unknown(name)


def validate_scenario_name(name: str) -> str:
    """Normalised name if it is a concrete scenario or ``mix`` (for CLI flags); ScenarioError otherwise."""
    key = name.strip().lower() if isinstance(name, str) else ""
    if is_mix(key):
        mix_weights(key)  # a shifted mix must name a known environment
        return key
    return parse_scenario(name).name


# The fleet mix: mostly nominal driving, some interactive hazards, a sprinkle of CCR cases.
MIX_WEIGHTS: dict[str, float] = {"highway": 0.40, "dense": 0.25, "cut-in": 0.10, "merge": 0.10, "ccr": 0.15}


# The evaluation gate's scenario classes, each its own unit test: the familiar ones, then the environments
# (appended: a class's held-out seeds follow from its position here).
SCENARIO_CLASSES = ("highway", "dense", "cut-in", "merge", "ccrs", "ccrm", "ccrb", *ENVIRONMENTS)
# The held-out scenarios of each environment class (its default parameters).
ENVIRONMENT_SUITE: dict[str, tuple[str, ...]] = {env: (ENVIRONMENT_DEFAULTS[env],) for env in ENVIRONMENTS}


def scenario_classes() -> tuple[str, ...]:
    """Every class the evaluation gate knows."""
    return SCENARIO_CLASSES


def scenario_class(name: str) -> str:
    """The class a concrete scenario name belongs to (its kind), for per-class rates; ScenarioError if unknown."""
    return parse_scenario(name).kind


def environment_signal(environment: str) -> str:
    """The recorder signal that is true while a vehicle drives in ``environment`` (``env_fog``, ...)."""
    if environment not in ENVIRONMENTS:
        raise ScenarioError(f"unknown environment {environment!r}; valid: {', '.join(ENVIRONMENTS)}")
    return f"env_{environment}"


ENVIRONMENT_SIGNALS: tuple[str, ...] = tuple(environment_signal(e) for e in ENVIRONMENTS)


def environment_signals(name: str) -> dict[str, bool]:
    """The ``env_*`` signals of a drive in scenario ``name`` (all false for a familiar or unknown name): a
    campaign can then collect in one environment only."""
    try:
        kind = parse_scenario(name).kind
    except ScenarioError:
        kind = ""
    return {environment_signal(e): kind == e for e in ENVIRONMENTS}


# After a shift (``mix+<environment>``) this share of the fleet's drives is in the new environment.
SHIFT_SHARE = 0.3


def is_mix(name: str) -> bool:
    """``mix`` or a shifted mix ``mix+<environment>`` (a distribution, not a scenario)."""
    return name == MIX or name.startswith(MIX + "+")


def mix_weights(name: str = MIX) -> dict[str, float]:
    """The weights of a mix: ``MIX_WEIGHTS``, or for ``mix+<env>`` those scaled by 1 - ``SHIFT_SHARE`` plus
    ``<env>`` at ``SHIFT_SHARE``."""
    if name == MIX:
        return dict(MIX_WEIGHTS)
    env = name[len(MIX) + 1:] if name.startswith(MIX + "+") else ""
    if env not in ENVIRONMENTS:
        raise ScenarioError(f"unknown mix {name!r}; valid: mix, " + ", ".join(f"mix+{e}" for e in ENVIRONMENTS))
    total = sum(MIX_WEIGHTS.values())
    return {**{k: w / total * (1.0 - SHIFT_SHARE) for k, w in MIX_WEIGHTS.items()}, env: SHIFT_SHARE}


def draw_mix(rng: np.random.Generator, name: str = MIX) -> str:
    """One scenario name drawn from the weighted mix ``name`` (CCR cases uniform within their share; an
    environment at its default parameters). The plain mix draws exactly as before shifts existed."""
    weights_by_key = mix_weights(name)
    keys = list(weights_by_key)
    weights = np.array([weights_by_key[k] for k in keys])
    pick = keys[int(rng.choice(len(keys), p=weights / weights.sum()))]
    if pick == "ccr":
        return CCR_CASES[int(rng.integers(len(CCR_CASES)))]
    return ENVIRONMENT_DEFAULTS.get(pick, pick)


def resolve_scenarios(name: str, count: int, rng: np.random.Generator) -> list[ScenarioSpec]:
    """Specs for ``count`` vehicles: the named scenario for all, or one draw each for a mix."""
    key = validate_scenario_name(name)
    if is_mix(key):
        return [parse_scenario(draw_mix(rng, key)) for _ in range(count)]
    spec = parse_scenario(key)
    return [spec] * count
