"""Scenario catalog: every name parses to the right spec, bad names fail clearly, the mix is weighted;
parametric CCR and cut-in names accept any physically valid parameters and refuse the rest naming the range."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from driveloop.sim.scenarios import (
    CCR_CASES,
    CCR_EGO_KMH,
    CCR_START_TTC_S,
    CCRB_DECEL_RANGE_MPS2,
    CCRB_HEADWAY_RANGE_M,
    CUTIN_CASES,
    CUTIN_DV_RANGE_KMH,
    CUTIN_DVS_KMH,
    CUTIN_EGO_KMH,
    CUTIN_GAP_RANGE_M,
    CUTIN_GAPS_M,
    CUTIN_LATERAL_RANGE_MPS,
    CUTIN_LATERALS_MPS,
    FAMILY_CASES,
    KMH,
    LANE_WIDTH_M,
    MIX_WEIGHTS,
    VEHICLE_WIDTH_M,
    ScenarioSpec,
    cut_in_ahead,
    cut_in_plan,
    draw_mix,
    parse_scenario,
    resolve_scenarios,
    scenario_names,
    validate_scenario_name,
)

from driveloop.core.exceptions import ScenarioError

CCRS = [(f"ccrs-{v}", v) for v in range(10, 85, 5)]
CCRM = [(f"ccrm-{v}", v) for v in range(30, 85, 5)]
CCRB = [(f"ccrb-{h}-{d}", h, d) for h in (12, 40) for d in (2, 6)]


def test_thirty_distinct_ccr_cases() -> None:
    assert len(CCR_CASES) == 30 == len(set(CCR_CASES))
    assert sorted(CCR_CASES) == sorted([n for n, _ in CCRS] + [n for n, _ in CCRM] + [c[0] for c in CCRB])
    assert (len(CCRS), len(CCRM), len(CCRB)) == (15, 11, 4)


@pytest.mark.parametrize(("name", "kmh"), CCRS, ids=[c[0] for c in CCRS])
def test_ccrs(name: str, kmh: int) -> None:
    spec = parse_scenario(name)
    assert (spec.kind, spec.hazard, spec.traffic_vehicles) == ("ccrs", True, 0)
    assert spec.ego_speed_mps == pytest.approx(kmh / 3.6)
    assert spec.target_speed_mps == 0.0 and spec.target_decel_mps2 == 0.0
    # Euro NCAP: start at TTC 4 s, never closer than 10 m.
    assert spec.headway_m == pytest.approx(max(CCR_START_TTC_S * kmh / 3.6, 10.0))
    assert spec.duration_s > spec.headway_m / spec.ego_speed_mps


@pytest.mark.parametrize(("name", "kmh"), CCRM, ids=[c[0] for c in CCRM])
def test_ccrm(name: str, kmh: int) -> None:
    spec = parse_scenario(name)
    assert spec.kind == "ccrm"
    assert spec.ego_speed_mps == pytest.approx(kmh * KMH)
    assert spec.target_speed_mps == pytest.approx(20 / 3.6)
    assert spec.headway_m == pytest.approx(max(4.0 * (kmh - 20) / 3.6, 10.0))


@pytest.mark.parametrize(("name", "headway", "decel"), CCRB, ids=[c[0] for c in CCRB])
def test_ccrb(name: str, headway: int, decel: int) -> None:
    spec = parse_scenario(name)
    assert spec.kind == "ccrb"
    assert spec.ego_speed_mps == pytest.approx(50 / 3.6) == pytest.approx(spec.target_speed_mps)
    assert (spec.headway_m, spec.target_decel_mps2) == (headway, decel)


@pytest.mark.parametrize(
    ("name", "kind", "hazard"),
    [("highway", "highway", False), ("dense", "dense", False), ("cut-in", "cut-in", True), ("merge", "merge", True),
     ("  HighWay ", "highway", False), ("CCRS-50", "ccrs", True)],
)
def test_named_scenarios(name: str, kind: str, hazard: bool) -> None:
    spec = parse_scenario(name)
    assert (spec.kind, spec.hazard) == (kind, hazard)
    assert spec.lanes >= 2 and spec.name == name.strip().lower()


def test_dense_is_denser_and_slower_than_highway() -> None:
    hw, dense = parse_scenario("highway"), parse_scenario("dense")
    assert dense.traffic_vehicles / dense.lanes > hw.traffic_vehicles / hw.lanes
    assert dense.target_speed_mps < hw.target_speed_mps


BAD = ["", "foo", "ccrs-", "ccrs-50-1", "ccrs--5", "ccrs-1e2", "ccrb-12", "ccr-50", "highway2", "cut_in", "mix",
       "cutin-10-20", "cutin-10-20-1-1", "cut-in-10-20-1"]


@pytest.mark.parametrize("name", BAD)
def test_bad_names_raise_scenario_error(name: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(name)
    assert err.value.exit_code == 2
    if name != "mix":
        message = str(err.value)
        assert "valid:" in message and "highway" in message and "\n" not in message
        assert "ccrs-<5..130 km/h>" in message and "ccrb-<5..100 m>-<1..10 m/s2>" in message
        assert "cutin-<0..50 m>-<0..80 km/h>-<0.2..3 m/s>" in message


def test_non_string_name() -> None:
    with pytest.raises(ScenarioError):
        parse_scenario(42)  # type: ignore[arg-type]


def test_validate_accepts_mix_and_concrete_names() -> None:
    assert validate_scenario_name("MIX") == "mix"
    assert validate_scenario_name("ccrb-40-6") == "ccrb-40-6"
    assert validate_scenario_name("ccrs-11") == "ccrs-11"  # any ego speed in range, not only the NCAP grid
    with pytest.raises(ScenarioError):
        validate_scenario_name("ccrs-4")


def test_every_listed_name_parses() -> None:
    names = scenario_names()
    assert names[:4] == ("highway", "dense", "cut-in", "merge") and len(names) == 34
    assert [parse_scenario(n).name for n in names] == list(names)


@pytest.mark.parametrize(
    "field_values",
    [{"kind": "bogus"}, {"ego_speed_mps": -1.0}, {"ego_speed_mps": 41.0}, {"set_speed_mps": 0.0},
     {"target_speed_mps": 50.0}, {"headway_m": -1.0}, {"target_decel_mps2": -2.0}, {"traffic_vehicles": -1},
     {"lanes": 0}, {"lanes": 6}, {"duration_s": 0.0}],
)
def test_spec_validation(field_values: dict) -> None:
    base = {"name": "x", "kind": "highway", "ego_speed_mps": 20.0, "set_speed_mps": 20.0, "target_speed_mps": 20.0,
                "headway_m": 0.0, "target_decel_mps2": 0.0, "traffic_vehicles": 3, "lanes": 3, "duration_s": 10.0, "hazard": False}
    ScenarioSpec(**base)
    with pytest.raises(ScenarioError):
        ScenarioSpec(**{**base, **field_values})


def test_draw_mix_is_seeded_and_weighted() -> None:
    a = [draw_mix(np.random.default_rng(7)) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same draw
    rng = np.random.default_rng(0)
    draws = [draw_mix(rng) for _ in range(4000)]
    assert all(d in scenario_names() for d in draws)
    counts = collections.Counter("ccr" if d in CCR_CASES else d for d in draws)
    for key, weight in MIX_WEIGHTS.items():
        assert counts[key] / len(draws) == pytest.approx(weight, abs=0.03), key
    assert counts["highway"] + counts["dense"] > len(draws) / 2  # mostly nominal
    assert len({d for d in draws if d in CCR_CASES}) == 30  # every CCR case reachable


def test_resolve_scenarios() -> None:
    same = resolve_scenarios("cut-in", 3, np.random.default_rng(0))
    assert [s.name for s in same] == ["cut-in"] * 3
    mixed = resolve_scenarios("mix", 50, np.random.default_rng(1))
    assert len(mixed) == 50 and len({s.name for s in mixed}) > 3
    assert [s.name for s in resolve_scenarios("mix", 50, np.random.default_rng(1))] == [s.name for s in mixed]
    with pytest.raises(ScenarioError):
        resolve_scenarios("nope", 2, np.random.default_rng(0))


# -- parametric CCR (any physically valid parameters; the suite's default stays the 30 NCAP cases) ---------------
@pytest.mark.parametrize(("name", "kind", "ego_kmh", "target_kmh", "headway", "decel"), [
    ("ccrs-12", "ccrs", 12, 0, None, 0.0),  # between the NCAP grid's steps
    (f"ccrs-{CCR_EGO_KMH[0]:g}", "ccrs", CCR_EGO_KMH[0], 0, None, 0.0),
    (f"ccrs-{CCR_EGO_KMH[1]:g}", "ccrs", CCR_EGO_KMH[1], 0, None, 0.0),
    ("ccrs-62.5", "ccrs", 62.5, 0, None, 0.0),
    ("ccrm-25", "ccrm", 25, 20, None, 0.0),
    (f"ccrm-{CCR_EGO_KMH[1]:g}", "ccrm", CCR_EGO_KMH[1], 20, None, 0.0),
    (f"ccrb-{CCRB_HEADWAY_RANGE_M[0]:g}-{CCRB_DECEL_RANGE_MPS2[0]:g}", "ccrb", 50, 50, CCRB_HEADWAY_RANGE_M[0],
     CCRB_DECEL_RANGE_MPS2[0]),
    (f"ccrb-{CCRB_HEADWAY_RANGE_M[1]:g}-{CCRB_DECEL_RANGE_MPS2[1]:g}", "ccrb", 50, 50, CCRB_HEADWAY_RANGE_M[1],
     CCRB_DECEL_RANGE_MPS2[1]),
    ("ccrb-20-2.5", "ccrb", 50, 50, 20.0, 2.5),
])
def test_parametric_ccr_names(name: str, kind: str, ego_kmh: float, target_kmh: float, headway: float | None,
                              decel: float) -> None:
    spec = parse_scenario(name)
    assert (spec.name, spec.kind, spec.is_ccr, spec.family) == (name, kind, True, "ccr")
    assert spec.ego_speed_mps == pytest.approx(ego_kmh * KMH) and spec.target_speed_mps == pytest.approx(target_kmh * KMH)
    expected_gap = headway if headway is not None else max(CCR_START_TTC_S * (ego_kmh - target_kmh) * KMH, 10.0)
    assert spec.headway_m == pytest.approx(expected_gap) and spec.target_decel_mps2 == decel
    assert spec.duration_s > 0


@pytest.mark.parametrize(("name", "message"), [
    (f"ccrs-{CCR_EGO_KMH[0] - 1:g}", "scenario 'ccrs-4': ego speed 4 km/h is outside 5..130 km/h"),
    (f"ccrs-{CCR_EGO_KMH[1] + 1:g}", "scenario 'ccrs-131': ego speed 131 km/h is outside 5..130 km/h"),
    ("ccrs-0", "scenario 'ccrs-0': ego speed 0 km/h is outside 5..130 km/h"),
    ("ccrm-4.5", "scenario 'ccrm-4.5': ego speed 4.5 km/h is outside 5..130 km/h"),
    (f"ccrb-{CCRB_HEADWAY_RANGE_M[0] - 1:g}-2", "scenario 'ccrb-4-2': headway 4 m is outside 5..100 m"),
    (f"ccrb-{CCRB_HEADWAY_RANGE_M[1] + 1:g}-2", "scenario 'ccrb-101-2': headway 101 m is outside 5..100 m"),
    ("ccrb-12-0.5", "scenario 'ccrb-12-0.5': target deceleration 0.5 m/s2 is outside 1..10 m/s2"),
    (f"ccrb-12-{CCRB_DECEL_RANGE_MPS2[1] + 1:g}", "scenario 'ccrb-12-11': target deceleration 11 m/s2 is outside "
                                                  "1..10 m/s2"),
])
def test_ccr_parameters_outside_their_range_are_one_line_errors(name: str, message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(name)
    assert str(err.value) == message and err.value.exit_code == 2


def test_a_parametric_name_has_one_canonical_spelling() -> None:
    assert parse_scenario("CCRB-12.0-6").name == "ccrb-12-6" == parse_scenario("ccrb-012-6.00").name
    assert parse_scenario("ccrb-12.0-6") == parse_scenario("ccrb-12-6")  # the NCAP case itself
    assert parse_scenario("cutin-10.0-20-1.0").name == "cutin-10-20-1"


def test_the_ncap_grid_is_still_the_ccr_family() -> None:
    assert FAMILY_CASES["ccr"] == CCR_CASES and len(CCR_CASES) == 30
    assert all(parse_scenario(n).family == "ccr" for n in CCR_CASES)


# -- the parametric cut-in ---------------------------------------------------------------------------------------
def test_cut_in_names_and_plan() -> None:
    spec = parse_scenario("cutin-10-36-1")
    assert (spec.kind, spec.family, spec.is_ccr, spec.traffic_vehicles) == ("cutin", "cut-in", False, 0)
    assert spec.ego_speed_mps == pytest.approx(CUTIN_EGO_KMH * KMH) == spec.set_speed_mps
    assert spec.ego_speed_mps - spec.target_speed_mps == pytest.approx(10.0)  # 36 km/h slower
    assert (spec.headway_m, spec.lateral_speed_mps) == (10.0, 1.0)
    plan = cut_in_plan(spec)
    crossing_offset = LANE_WIDTH_M / 2 + VEHICLE_WIDTH_M / 2
    assert plan.crossing_offset_m == crossing_offset
    # it moves in from start_s; its side reaches the marking at crossing_s, when the gap is the named one
    assert plan.crossing_s == pytest.approx(plan.start_s + (plan.start_offset_m - crossing_offset) / 1.0)
    assert plan.start_gap_m - 10.0 * plan.crossing_s == pytest.approx(plan.crossing_gap_m) == pytest.approx(10.0)
    assert round(plan.crossing_s / 0.1) != plan.crossing_s / 0.1  # between two control ticks, never on one
    assert spec.duration_s > plan.crossing_s + 5.0
    with pytest.raises(ScenarioError, match="not a parametric cut-in"):
        cut_in_plan(parse_scenario("cut-in"))


@pytest.mark.parametrize(("name", "message"), [
    ("cutin-51-20-1", "scenario 'cutin-51-20-1': gap 51 m is outside 0..50 m"),
    ("cutin-10-81-1", "scenario 'cutin-10-81-1': relative speed 81 km/h is outside 0..80 km/h"),
    ("cutin-10-20-0.1", "scenario 'cutin-10-20-0.1': lateral speed 0.1 m/s is outside 0.2..3 m/s"),
    ("cutin-10-20-3.5", "scenario 'cutin-10-20-3.5': lateral speed 3.5 m/s is outside 0.2..3 m/s"),
    ("cutin-0-60-0.5", "scenario 'cutin-0-60-0.5' is no cut-in ahead: the ego would have passed the car before it "
                       "reaches the ego's path (larger gap or lateral speed, or smaller relative speed)"),
])
def test_cut_in_parameters_outside_their_range_are_one_line_errors(name: str, message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(name)
    assert str(err.value) == message


def test_ranges_are_inclusive() -> None:
    lo = f"cutin-{CUTIN_GAP_RANGE_M[0]:g}-{CUTIN_DV_RANGE_KMH[0]:g}-{CUTIN_LATERAL_RANGE_MPS[0]:g}"
    hi = f"cutin-{CUTIN_GAP_RANGE_M[1]:g}-{CUTIN_DV_RANGE_KMH[1]:g}-{CUTIN_LATERAL_RANGE_MPS[1]:g}"
    assert parse_scenario(lo).name == lo and parse_scenario(hi).name == hi


def test_cut_in_ahead_is_the_ego_not_past_the_car_when_it_reaches_the_path() -> None:
    """Holding its speed, the ego gains dv x (1 m / lateral speed) before the car's side reaches its path; more
    than the two car lengths and it has passed: the car merges in behind, no cut-in ahead."""
    dv_mps = 10.0
    lateral = 1.0
    passed_at_m = dv_mps * (VEHICLE_WIDTH_M / 2) / lateral - 10.0  # the gap at the crossing that just passes
    assert cut_in_ahead(passed_at_m + 0.01, dv_mps / KMH, lateral)
    assert not cut_in_ahead(passed_at_m - 0.01, dv_mps / KMH, lateral)
    assert cut_in_ahead(0.0, 0.0, 0.2)  # no closing: always ahead


def test_the_cut_in_grid_is_every_combination_that_cuts_in_ahead() -> None:
    product = [(g, dv, lat) for g in CUTIN_GAPS_M for dv in CUTIN_DVS_KMH for lat in CUTIN_LATERALS_MPS]
    assert CUTIN_CASES == tuple(f"cutin-{g}-{dv}-{lat:g}" for g, dv, lat in product if cut_in_ahead(g, dv, lat))
    assert FAMILY_CASES["cut-in"] == CUTIN_CASES and len(CUTIN_CASES) == 65
    assert {parse_scenario(n).family for n in CUTIN_CASES} == {"cut-in"}


def test_families() -> None:
    assert [parse_scenario(n).family for n in ("highway", "dense", "cut-in", "merge")] == [None] * 4
