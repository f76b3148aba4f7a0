"""The environments the bootstrap model never saw (construction, fog, slippery, aggressive): parametric names parse
and refuse out-of-range parameters, scenes are seeded, each is solvable (the IDM expert drives it without a
collision), fog degrades the sensors, friction limits braking, a shifted mix adds the environment at its share
and leaves the plain mix's draws as they were, and the ``env_*`` signals name the environment a drive is in."""

from __future__ import annotations

import math

import numpy as np
import pytest

from driveloop.core.exceptions import ScenarioError
from driveloop.sim.scenarios import (
    AGGRESSIVE_DV_RANGE_KMH,
    AGGRESSIVE_GAP_RANGE_M,
    CONSTRUCTION_GAP_RANGE_M,
    ENVIRONMENT_DEFAULTS,
    ENVIRONMENT_SIGNALS,
    ENVIRONMENTS,
    FOG_DROPOUT_P,
    FOG_NOISE_SIGMA,
    FOG_VISIBILITY_RANGE_M,
    FRICTION_RANGE,
    GRAVITY_MPS2,
    KMH,
    MIX_WEIGHTS,
    SCENARIO_CLASSES,
    SHIFT_SHARE,
    draw_mix,
    environment_signals,
    mix_weights,
    parse_scenario,
    resolve_scenarios,
    scenario_class,
    validate_scenario_name,
)
from driveloop.sim.simulator import Simulator
from driveloop.sim.world import gap_m

# name -> (kind, one field the parameters set, its value)
PARSES = {
    "construction-12-20": ("construction", "headway_m", 12.0),
    "construction-8-30": ("construction", "target_speed_mps", 80 * KMH - 30 * KMH),
    "fog-40": ("fog", "visibility_m", 40.0),
    "fog-120.0": ("fog", "visibility_m", 120.0),
    "slippery-0.4": ("slippery", "friction_mu", 0.4),
    "slippery-1": ("slippery", "friction_mu", 1.0),
    "aggressive-9-25": ("aggressive", "headway_m", 9.0),
    "aggressive-15-40": ("aggressive", "target_speed_mps", 25.0 - 40 * KMH),
}


@pytest.mark.parametrize("name", sorted(PARSES))
def test_parametric_names_parse(name: str) -> None:
    kind, attr, value = PARSES[name]
    spec = parse_scenario(name)
    assert spec.kind == kind and scenario_class(name) == kind
    assert getattr(spec, attr) == pytest.approx(value)
    assert validate_scenario_name(name.upper()) == spec.name  # canonical, whatever the spelling


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_bare_name_is_the_default(env: str) -> None:
    assert parse_scenario(env) == parse_scenario(ENVIRONMENT_DEFAULTS[env])
    assert parse_scenario(env).name == ENVIRONMENT_DEFAULTS[env]


OUT_OF_RANGE = {
    f"fog-{FOG_VISIBILITY_RANGE_M[0] - 1:g}": "visibility",
    f"fog-{FOG_VISIBILITY_RANGE_M[1] + 1:g}": "visibility",
    f"slippery-{FRICTION_RANGE[0] - 0.1:g}": "friction",
    f"slippery-{FRICTION_RANGE[1] + 0.5:g}": "friction",
    f"construction-{CONSTRUCTION_GAP_RANGE_M[0] - 1:g}-20": "merge gap",
    f"aggressive-{AGGRESSIVE_GAP_RANGE_M[1] + 1:g}-20": "gap",
    f"aggressive-10-{AGGRESSIVE_DV_RANGE_KMH[1] + 1:g}": "relative speed",
}


@pytest.mark.parametrize("name", sorted(OUT_OF_RANGE))
def test_out_of_range_parameters_are_refused_naming_the_range(name: str) -> None:
    with pytest.raises(ScenarioError, match=OUT_OF_RANGE[name]) as e:
        parse_scenario(name)
    assert "outside" in str(e.value)


def test_every_environment_is_a_gate_class_after_the_familiar_ones() -> None:
    assert SCENARIO_CLASSES[:7] == ("highway", "dense", "cut-in", "merge", "ccrs", "ccrm", "ccrb")
    assert SCENARIO_CLASSES[7:] == ENVIRONMENTS
    from driveloop.cloud.evaluation import SCENARIO_CLASSES as GATE_CLASSES
    from driveloop.cloud.evaluation import EvalSuite

    assert GATE_CLASSES == SCENARIO_CLASSES
    EvalSuite(classes={env: (env,) for env in ENVIRONMENTS})  # accepted by the gate's suite


def _drive_expert(name: str, seed: int) -> tuple[int, float, list[tuple[float, float]]]:
    """(collisions, min gap, trajectory) of the IDM expert over the scenario's natural length."""
    with Simulator(name, seed) as sim:
        snap = sim.reset()
        trajectory, min_gap = [], math.inf
        while not sim.done and not snap.crashed:
            snap = sim.step(*sim.expert_action())
            trajectory.append((round(snap.ego.x_m, 6), round(snap.speed_mps, 6)))
            min_gap = min(min_gap, gap_m(snap))
        return sim.collisions, min_gap, trajectory


SOLVABLE_SEEDS = range(6)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_expert_drives_every_environment_without_a_collision(env: str) -> None:
    """Solvable: the expert (IDM + lane keeping on ground truth) never collides, and something is in its way."""
    gaps = []
    for seed in SOLVABLE_SEEDS:
        collisions, min_gap, _ = _drive_expert(env, seed)
        assert collisions == 0, (env, seed)
        gaps.append(min_gap)
    assert min(gaps) < 60.0, "the environment put nobody in the ego's lane"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_environments_are_seeded(env: str) -> None:
    a, b, c = _drive_expert(env, 3)[2], _drive_expert(env, 3)[2], _drive_expert(env, 4)[2]
    assert a == b and a != c


def test_friction_limits_braking_to_mu_g() -> None:
    spec = parse_scenario("slippery-0.3")
    assert spec.max_decel_mps2 == pytest.approx(0.3 * GRAVITY_MPS2)
    with Simulator(spec, 0) as sim:
        sim.reset()
        for _ in range(30):  # a full brake command for 3 s: the tyres give no more than mu x g
            snap = sim.step(-9.0, 0.0)
            assert snap.accel_mps2 >= -spec.max_decel_mps2 - 1e-9
        assert snap.accel_mps2 == pytest.approx(-spec.max_decel_mps2, abs=0.05) or snap.speed_mps == 0.0
    with Simulator("ccrs-50", 0) as dry:  # a dry road keeps the actuator's own limit
        dry.reset()
        for _ in range(10):
            snap = dry.step(-9.0, 0.0)
        assert snap.accel_mps2 < -8.0


def test_fog_degrades_the_sensors_and_clear_scenes_keep_theirs() -> None:
    from driveloop.contracts.observation import LIDAR_RANGE_M
    from driveloop.sim.sensors import SensorConfig, SensorSuite

    base = SensorConfig()
    assert base.in_scenario(parse_scenario("highway")) is base
    fog = parse_scenario("fog-30")
    cfg = base.in_scenario(fog)
    assert cfg.visibility_m == 30.0 and cfg.seen_range_m == 30.0
    assert cfg.sigma == (FOG_NOISE_SIGMA,) * 3 and cfg.dropout_p == (FOG_DROPOUT_P,) * 3
    with Simulator(fog, 3) as sim:
        snap = sim.reset()
        for _ in range(30):
            snap = sim.step(*sim.expert_action())
    clear = SensorSuite(base, 1).observe(snap).observation
    seen = SensorSuite(SensorConfig(visibility_m=30.0), 1).observe(snap).observation  # the cut alone, no noise
    far = clear.lidar[0] > 30.0
    assert far.any() and (clear.lidar[0] < LIDAR_RANGE_M).any()
    assert (seen.lidar[0][far] == LIDAR_RANGE_M).all() and (seen.lidar[1][far] == 0.0).all()
    assert (seen.lidar[0][~far] == clear.lidar[0][~far]).all()
    rows_clear, rows_seen = clear.kinematics[6:].reshape(6, 5), seen.kinematics[6:].reshape(6, 5)
    assert all(math.hypot(r[1], r[2]) <= 30.0 for r in rows_seen if r[0] > 0.5)
    assert sum(r[0] > 0.5 for r in rows_seen) < sum(r[0] > 0.5 for r in rows_clear)
    assert seen.grid[0].sum() < clear.grid[0].sum()  # occupancy beyond the fog is gone


def test_shifted_mix_adds_the_environment_at_its_share() -> None:
    w = mix_weights("mix+fog")
    assert w["fog"] == SHIFT_SHARE and sum(w.values()) == pytest.approx(1.0)
    total = sum(MIX_WEIGHTS.values())
    for key, weight in MIX_WEIGHTS.items():
        assert w[key] == pytest.approx(weight / total * (1 - SHIFT_SHARE))
    draws = [draw_mix(np.random.default_rng(s), "mix+fog") for s in range(3000)]
    assert abs(draws.count(ENVIRONMENT_DEFAULTS["fog"]) / len(draws) - SHIFT_SHARE) < 0.03
    assert validate_scenario_name("mix+fog") == "mix+fog"
    specs = resolve_scenarios("mix+slippery", 400, np.random.default_rng(1))
    assert 0.2 < sum(s.kind == "slippery" for s in specs) / 400 < 0.4
    with pytest.raises(ScenarioError, match="mix\\+construction"):
        validate_scenario_name("mix+rain")
    with pytest.raises(ScenarioError, match="distribution"):
        parse_scenario("mix+fog")


def test_plain_mix_draws_as_before_shifts_existed() -> None:
    """The familiar mix's draws (what every recorded demo row depends on): the same generator calls as before."""
    def old_draw(rng: np.random.Generator) -> str:
        from driveloop.sim.scenarios import CCR_CASES

        keys = list(MIX_WEIGHTS)
        weights = np.array([MIX_WEIGHTS[k] for k in keys])
        pick = keys[int(rng.choice(len(keys), p=weights / weights.sum()))]
        return CCR_CASES[int(rng.integers(len(CCR_CASES)))] if pick == "ccr" else pick

    for seed in range(200):
        assert draw_mix(np.random.default_rng(seed)) == old_draw(np.random.default_rng(seed))


def test_environment_signals_name_the_environment() -> None:
    assert ENVIRONMENT_SIGNALS == tuple(f"env_{e}" for e in ENVIRONMENTS)
    assert environment_signals("fog-60") == {s: s == "env_fog" for s in ENVIRONMENT_SIGNALS}
    assert environment_signals("highway") == dict.fromkeys(ENVIRONMENT_SIGNALS, False)
    assert environment_signals("not-a-scenario") == dict.fromkeys(ENVIRONMENT_SIGNALS, False)
