"""The jam-tail scenarios: one road for the whole fleet, the jam beyond sensor range, solvable without hazards."""

from __future__ import annotations

import math

import numpy as np
import pytest

from driveloop.core.exceptions import ScenarioError
from driveloop.edge.agent import AgentConfig, VehicleAgent
from driveloop.safety import ModelReply
from driveloop.sim.scenarios import (
    JAM_APPROACH_M,
    JAM_FLEET_SPACING_M,
    JAM_FOG_VISIBILITY_M,
    JAM_TAIL_X_M,
    SHARED_ROAD_KINDS,
    jam_tail_name,
    parse_scenario,
    validate_scenario_name,
)
from driveloop.sim.sensors import SensorConfig
from driveloop.sim.simulator import Simulator
from driveloop.sim.world import gap_m


def test_names_parse_and_are_canonical() -> None:
    plain, fog = parse_scenario("jam-tail"), parse_scenario("jam-tail-fog")
    assert plain.kind == fog.kind == "jam-tail" and "jam-tail" in SHARED_ROAD_KINDS
    assert (plain.headway_m, plain.target_speed_mps, plain.hazard) == (JAM_APPROACH_M, 0.0, True)
    assert math.isinf(plain.visibility_m) and fog.visibility_m == JAM_FOG_VISIBILITY_M
    assert fog.ego_speed_mps < plain.ego_speed_mps
    assert parse_scenario("jam-tail-400.0").name == "jam-tail-400"
    assert parse_scenario("jam-tail-0").name == "jam-tail"
    assert parse_scenario("jam-tail-fog-800").headway_m == JAM_APPROACH_M + 800
    assert validate_scenario_name("JAM-TAIL") == "jam-tail"
    # long enough to reach the tail at its speed, slow down and stand
    assert plain.duration_s > plain.headway_m / plain.ego_speed_mps + 30
    with pytest.raises(ScenarioError, match="outside 0..5000 m"):
        parse_scenario("jam-tail-6000")
    with pytest.raises(ScenarioError, match="unknown scenario"):
        parse_scenario("jam-tails")


def test_fleet_vehicle_i_starts_further_back() -> None:
    assert jam_tail_name("jam-tail", 0) == "jam-tail"
    assert [jam_tail_name("jam-tail", i) for i in (1, 3)] == [f"jam-tail-{JAM_FLEET_SPACING_M:g}",
                                                             f"jam-tail-{3 * JAM_FLEET_SPACING_M:g}"]
    assert jam_tail_name("jam-tail-fog-100", 2) == f"jam-tail-fog-{100 + 2 * JAM_FLEET_SPACING_M:g}"
    assert jam_tail_name("highway", 5) == "highway" and jam_tail_name("mix", 2) == "mix"


@pytest.mark.parametrize("name", ["jam-tail", "jam-tail-1200", "jam-tail-fog-400"])
def test_the_jam_stands_at_the_same_road_x_in_every_world(name: str) -> None:
    spec = parse_scenario(name)
    for seed in (0, 1):
        with Simulator(spec, seed) as sim:
            snap = sim.reset()
            assert gap_m(snap) == pytest.approx(spec.headway_m, abs=1e-6)  # the tail is exactly there
            assert snap.ego.x_m + snap.ego.length_m / 2 + spec.headway_m == pytest.approx(JAM_TAIL_X_M)
            assert all(o.vx_mps == 0.0 and o.x_m - o.length_m / 2 >= JAM_TAIL_X_M - 1e-6 for o in snap.others)
            assert len({o.lane_index for o in snap.others}) == spec.lanes  # every lane blocked
            assert snap.speed_mps == spec.ego_speed_mps


@pytest.mark.parametrize("name", ["jam-tail", "jam-tail-fog"])
def test_the_expert_drives_it_without_a_collision(name: str) -> None:
    with Simulator(name, seed=3) as sim:
        sim.reset()
        while not sim.done and not sim.crashed:
            snap = sim.step(*sim.expert_action())
        assert sim.collisions == 0 and snap.speed_mps < 0.5
        assert 0.0 < gap_m(snap) < 20.0  # it stopped behind the jam's tail


def hold_speed(now_s: float) -> ModelReply:
    """A model that sees nothing: keeps its speed (only the AEB can stop it)."""
    return ModelReply(np.array([0.0, 0.0], np.float32), np.array([0.9], np.float32), now_s)


@pytest.mark.parametrize("name", ["jam-tail", "jam-tail-fog"])
def test_the_aeb_alone_stops_a_blind_vehicle_before_the_jam(name: str) -> None:
    """The jam is far beyond sensor range (and in fog the sensors see 70 m, noisily): the first vehicle to meet
    it has to brake hard, and can, with nothing but the AEB."""
    agent = VehicleAgent("veh000", name, 0, AgentConfig(sensors=SensorConfig()), log_expert=False)
    spec = agent.spec
    first_brake_gap = None
    try:
        while agent.metrics.episodes == 1:
            agent.sense()
            d = agent.decide(hold_speed(agent.t_s + 0.05))
            if d.aeb and first_brake_gap is None:
                first_brake_gap = gap_m(agent.snapshot)
            agent.advance()
    finally:
        agent.close()
    assert agent.metrics.collisions == 0 and agent.metrics.aeb_activations_at_speed >= 1
    assert agent.metrics.peak_decel_mps2 > 5.0  # hard braking: what the hazards are to spare the vehicles behind
    assert first_brake_gap is not None and first_brake_gap <= min(spec.visibility_m, 100.0)
