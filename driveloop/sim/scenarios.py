"""The scenario catalog: every drive the fleet, the safety suite and the evaluation gate can ask for.

A scenario is a *name* (what a person types, what a segment records) that parses into a frozen
:class:`ScenarioSpec`; the simulator builds the scene from the spec and a seed, so a name plus a seed
replays a drive exactly.

Names (``scenario_names()`` lists every concrete one):

- ``highway``  nominal cruise, 4 lanes, light traffic.
- ``dense``    nominal dense traffic, 3 lanes, slower and closer.
- ``cut-in``   a vehicle from the adjacent lane cuts in ahead of the ego: tight, avoidable by braking.
- ``merge``    a vehicle merges from an on-ramp into the ego lane ahead of the ego.
- Euro NCAP car-to-car rear (30 cases, ``CCR_CASES``), two vehicles, one lane of interest:
  ``ccrs-<kmh>`` stationary target, ego 10..80 km/h step 5 (15 cases);
  ``ccrm-<kmh>`` target moving at 20 km/h, ego 30..80 km/h step 5 (11 cases);
  ``ccrb-<headway_m>-<decel>`` both at 50 km/h, headway 12 or 40 m, target brakes at 2 or 6 m/s²
  (4 cases).
- ``mix`` is not a scenario but a distribution (:func:`draw_mix`): each vehicle draws its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from driveloop.core.exceptions import ScenarioError

KMH = 1 / 3.6  # km/h → m/s

KINDS = ("highway", "dense", "cut-in", "merge", "ccrs", "ccrm", "ccrb")
NOMINAL_KINDS = ("highway", "dense")
MIX = "mix"

CCRS_SPEEDS_KMH = tuple(range(10, 85, 5))
CCRM_SPEEDS_KMH = tuple(range(30, 85, 5))
CCRM_TARGET_KMH = 20
CCRB_SPEED_KMH = 50
CCRB_HEADWAYS_M = (12, 40)
CCRB_DECELS_MPS2 = (2, 6)
# Euro NCAP starts a CCR run at a time-to-collision of 4 s (CCRs/CCRm); never closer than this.
CCR_START_TTC_S = 4.0
CCR_MIN_START_GAP_M = 10.0

_CCRS_RE = re.compile(r"^ccrs-(\d+)$")
_CCRM_RE = re.compile(r"^ccrm-(\d+)$")
_CCRB_RE = re.compile(r"^ccrb-(\d+)-(\d+)$")


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

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScenarioError(f"unknown scenario kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if not 0 <= self.ego_speed_mps <= 40 or not 0 < self.set_speed_mps <= 40:
            raise ScenarioError(f"{self.name}: ego speed out of 0..40 m/s")
        if not 0 <= self.target_speed_mps <= 40:
            raise ScenarioError(f"{self.name}: target speed out of 0..40 m/s")
        if self.headway_m < 0 or self.target_decel_mps2 < 0:
            raise ScenarioError(f"{self.name}: headway and decel must be >= 0")
        if self.traffic_vehicles < 0 or not 1 <= self.lanes <= 5:
            raise ScenarioError(f"{self.name}: bad traffic count or lane count")
        if self.duration_s <= 0:
            raise ScenarioError(f"{self.name}: duration must be > 0")

    @property
    def is_ccr(self) -> bool:
        return self.kind in ("ccrs", "ccrm", "ccrb")


def _ccr_names() -> tuple[str, ...]:
    names = [f"ccrs-{v}" for v in CCRS_SPEEDS_KMH]
    names += [f"ccrm-{v}" for v in CCRM_SPEEDS_KMH]
    names += [f"ccrb-{h}-{d}" for h in CCRB_HEADWAYS_M for d in CCRB_DECELS_MPS2]
    return tuple(names)


CCR_CASES: tuple[str, ...] = _ccr_names()
BASE_NAMES: tuple[str, ...] = ("highway", "dense", "cut-in", "merge")


def scenario_names() -> tuple[str, ...]:
    """Every concrete scenario name (not ``mix``), nominal first."""
    return BASE_NAMES + CCR_CASES


def _unknown(name: str) -> ScenarioError:
    return ScenarioError(
        f"unknown scenario {name!r}; valid: highway, dense, cut-in, merge, mix, "
        f"ccrs-<{CCRS_SPEEDS_KMH[0]}..{CCRS_SPEEDS_KMH[-1]} step 5 km/h>, "
        f"ccrm-<{CCRM_SPEEDS_KMH[0]}..{CCRM_SPEEDS_KMH[-1]} step 5 km/h>, "
        f"ccrb-<{'|'.join(map(str, CCRB_HEADWAYS_M))} m>-<{'|'.join(map(str, CCRB_DECELS_MPS2))} m/s2>"
    )


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


def _ccr(name: str, kind: str, ego_kmh: int, target_kmh: int, headway: float | None, decel: float) -> ScenarioSpec:
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


def parse_scenario(name: str) -> ScenarioSpec:
    """The spec for a concrete scenario name; ScenarioError (listing the valid names) otherwise."""
    if not isinstance(name, str):
        raise _unknown(repr(name))
    key = name.strip().lower()
    if key in BASE_NAMES:
        return _nominal(key)
    if key == MIX:
        raise ScenarioError("'mix' is a distribution, not a scenario: draw one per vehicle with draw_mix()")
    if m := _CCRS_RE.match(key):
        kmh = int(m.group(1))
        if kmh in CCRS_SPEEDS_KMH:
            return _ccr(key, "ccrs", kmh, 0, None, 0.0)
    elif m := _CCRM_RE.match(key):
        kmh = int(m.group(1))
        if kmh in CCRM_SPEEDS_KMH:
            return _ccr(key, "ccrm", kmh, CCRM_TARGET_KMH, None, 0.0)
    elif m := _CCRB_RE.match(key):
        headway, decel = int(m.group(1)), int(m.group(2))
        if headway in CCRB_HEADWAYS_M and decel in CCRB_DECELS_MPS2:
            return _ccr(key, "ccrb", CCRB_SPEED_KMH, CCRB_SPEED_KMH, float(headway), float(decel))
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
