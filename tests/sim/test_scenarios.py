"""Scenario catalog: every name parses to the right spec, bad names fail clearly, the mix is weighted."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from driveloop.sim.scenarios import (
    CCR_CASES,
    CCR_START_TTC_S,
    KMH,
    MIX_WEIGHTS,
    ScenarioSpec,
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


BAD = ["", "foo", "ccrs-12", "ccrs-5", "ccrs-85", "ccrs-", "ccrs-50-1", "ccrm-25", "ccrm-85", "ccrb-12-4",
       "ccrb-20-2", "ccrb-12", "ccr-50", "highway2", "cut_in", "mix"]


@pytest.mark.parametrize("name", BAD)
def test_bad_names_raise_scenario_error(name: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(name)
    assert err.value.exit_code == 2
    if name != "mix":
        assert "valid:" in str(err.value) and "ccrb-" in str(err.value) and "highway" in str(err.value)


def test_non_string_name() -> None:
    with pytest.raises(ScenarioError):
        parse_scenario(42)  # type: ignore[arg-type]


def test_validate_accepts_mix_and_concrete_names() -> None:
    assert validate_scenario_name("MIX") == "mix"
    assert validate_scenario_name("ccrb-40-6") == "ccrb-40-6"
    with pytest.raises(ScenarioError):
        validate_scenario_name("ccrs-11")


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
