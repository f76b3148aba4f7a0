"""Ground-truth helpers: the fast paths give exactly what the plain definitions give."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from driveloop.sim import world
from driveloop.sim.world import VehicleState, WorldSnapshot


def _random_world(rng: np.random.Generator, n_others: int) -> WorldSnapshot:
    def vehicle(i: int) -> VehicleState:
        return VehicleState(i, float(rng.uniform(-80, 80)), float(rng.uniform(-8, 8)), float(rng.uniform(0, 35)),
                            float(rng.uniform(-2, 2)), float(rng.uniform(-0.4, 0.4)), float(rng.uniform(4, 6)),
                            float(rng.uniform(1.8, 2.2)), int(rng.integers(0, 4)))

    ego = dataclasses.replace(vehicle(0), x_m=0.0)
    return WorldSnapshot(float(rng.uniform(0, 30)), ego, 20.0, 0.1, 0.0, float(rng.uniform(-0.2, 0.2)), 0.3, 25.0,
                         float(rng.choice([0.0, 4.0])), tuple(vehicle(i + 1) for i in range(n_others)),
                         bool(rng.integers(0, 2)), False)


def _lead_by_definition(snap: WorldSnapshot) -> VehicleState | None:
    """lead_vehicle as first written: to_ego_frame per vehicle."""
    half = snap.lane_width_m / 2 if snap.lane_width_m > 0 else world.DEFAULT_CORRIDOR_HALF_WIDTH_M
    best, best_dx = None, math.inf
    for other in snap.others:
        dx, dy = world.to_ego_frame(snap.ego, other.x_m, other.y_m)
        if dx > 0 and abs(dy) < half and dx < best_dx:
            best, best_dx = other, dx
    return best


@pytest.mark.parametrize("seed", range(200))
def test_lead_vehicle_and_gap_match_the_definition(seed: int) -> None:
    snap = _random_world(np.random.default_rng(seed), seed % 25)
    expected = _lead_by_definition(snap)
    assert world.lead_vehicle(snap) is expected
    if expected is None:
        assert world.gap_m(snap) == math.inf
    else:
        dx, _ = world.to_ego_frame(snap.ego, expected.x_m, expected.y_m)
        assert world.gap_m(snap) == dx - (snap.ego.length_m + expected.length_m) / 2


@pytest.mark.parametrize("seed", range(20))
def test_to_dict_is_every_field_in_order_and_round_trips(seed: int) -> None:
    snap = _random_world(np.random.default_rng(seed), seed)
    data = snap.to_dict()
    assert list(data) == [f.name for f in dataclasses.fields(WorldSnapshot)]
    for f in dataclasses.fields(WorldSnapshot):
        if f.name not in ("ego", "others"):
            assert data[f.name] == getattr(snap, f.name)
    vehicle_fields = [f.name for f in dataclasses.fields(VehicleState)]
    for v, d in zip((snap.ego, *snap.others), (data["ego"], *data["others"])):
        assert list(d) == vehicle_fields and d == {name: getattr(v, name) for name in vehicle_fields}
    assert len(data["others"]) == len(snap.others)
    assert WorldSnapshot.from_dict(data) == snap
    data["ego"]["x_m"] = 1e6  # the dicts are copies: changing one leaves the snapshot as it was
    assert snap.ego.x_m != 1e6
