"""The hazard service's book: events to DENM causes, one action per place, repetition, cancellation, rate limit."""

from __future__ import annotations

import math
import stat

import pytest

from driveloop.cloud.hazard_service import load_signer, public_key, read_active
from driveloop.cloud.hazards import (
    CLEARED_BY_TRAFFIC,
    END_OF_QUEUE_ADVICE,
    HazardBook,
    HazardPolicy,
    visibility_speed_mps,
)
from driveloop.contracts.hazard import CAUSES, HazardVerifier
from driveloop.contracts.stream import WATCH_CELLS, Telemetry, VehicleEvent, cell_of, hazard_cells
from driveloop.core.exceptions import ConfigError

NOW = 1_800_000_000.0


def event(kind: str = "aeb_full", x: float = 5900.0, wall: float = NOW, speed: float = 25.0, **detail: object
          ) -> VehicleEvent:
    return VehicleEvent(vehicle_id="veh000", seq=1, t_s=10.0, wall_ts=wall, road="hw1", x_m=x, y_m=0.0, lane=1,
                        speed_mps=speed, kind=kind, decel_mps2=9.0, detail=detail)  # type: ignore[arg-type]


def tel(x: float, speed: float, wall: float, road: str = "hw1") -> Telemetry:
    return Telemetry(vehicle_id="veh001", seq=1, t_s=1.0, wall_ts=wall, road=road, x_m=x, y_m=0.0, lane=1,
                     speed_mps=speed, accel_mps2=0.0, mode="model")


CASES = [
    # name, event, cause, sub-cause, event position
    ("full AEB for a standing lead: end of queue at the lead", event(gap_m=80.0, lead_speed_mps=0.0),
     CAUSES["dangerousEndOfQueue"], 1, 5980.0),
    ("partial AEB, lead unknown: end of queue at the vehicle", event(kind="aeb"), CAUSES["dangerousEndOfQueue"], 1,
     5900.0),
    ("AEB for a moving lead: collision risk", event(gap_m=20.0, lead_speed_mps=15.0), CAUSES["collisionRisk"], 0,
     5920.0),
    ("standing in a queue", event(kind="slow_traffic", speed=0.0, gap_m=4.0), CAUSES["dangerousEndOfQueue"], 0,
     5904.0),
    ("fog", event(kind="sensor_degraded", visibility_m=70.0), CAUSES["adverseWeatherCondition-Visibility"], 1,
     5900.0),
    ("the fallback stopped a vehicle in its lane", event(kind="watchdog", speed=0.0, fault="dead"),
     CAUSES["stationaryVehicle"], 2, 5900.0),
]


@pytest.mark.parametrize(("name", "ev", "cause", "sub", "x"), CASES, ids=[c[0] for c in CASES])
def test_events_become_hazards_by_the_table(name: str, ev: VehicleEvent, cause: int, sub: int, x: float) -> None:
    book = HazardBook()
    assert book.on_event(ev, NOW) == 0
    (h,) = book.active(NOW)
    assert (h.cause, h.sub_cause, h.x_m, h.road, h.lane) == (cause, sub, x, "hw1", 1)
    assert h.relevance.from_x_m == x - book.policy.upstream_m and h.relevance.to_x_m == x + book.policy.downstream_m
    assert h.relevance.cells == tuple(range(cell_of(h.relevance.from_x_m), cell_of(h.relevance.to_x_m) + 1))
    assert (h.detection_time, h.reference_time, h.validity_s) == (NOW, NOW, book.policy.validity_s)


NO_HAZARD = [
    ("an fcw", event(kind="fcw")),
    ("a trigger", event(kind="trigger")),
    ("a watchdog fault while still moving", event(kind="watchdog", speed=20.0)),
    ("fog without a visibility", event(kind="sensor_degraded")),
    ("an event older than any validity", event(wall=NOW - 601.0)),
]


@pytest.mark.parametrize(("name", "ev"), NO_HAZARD, ids=[c[0] for c in NO_HAZARD])
def test_other_events_make_no_hazard(name: str, ev: VehicleEvent) -> None:
    book = HazardBook()
    assert book.on_event(ev, NOW) is None and book.active(NOW) == [] and book.due(NOW) == []


def test_visibility_speed_stops_within_the_visibility() -> None:
    v = visibility_speed_mps(70.0, 3.0)
    assert v * 1.0 + v * v / (2 * 3.0) == pytest.approx(70.0)
    assert visibility_speed_mps(0.0, 3.0) == 0.0


def test_events_at_one_place_merge_into_one_action_that_moves_upstream() -> None:
    book = HazardBook()
    assert book.on_event(event(x=5900.0), NOW) == 0
    assert [h.model_dump() for h in book.due(NOW)] == [book.active(NOW)[0].model_dump()]
    # the same spot again, soon: the same action, nothing new to publish
    assert book.on_event(event(x=5950.0), NOW + 0.5) == 0 and book.due(NOW + 0.5) == []
    # the queue grew upstream: the action moves, a new version (newer reference time) goes out at once
    assert book.on_event(event(x=5700.0), NOW + 0.6) == 0
    (moved,) = book.due(NOW + 0.6)
    assert (moved.x_m, moved.reference_time, moved.detection_time) == (5700.0, NOW + 0.6, NOW)
    assert moved.action_id.sequence_number == 0
    # farther than merge_m, or another cause: another action
    assert book.on_event(event(x=5700.0 - book.policy.merge_m - 1.0), NOW + 0.7) == 1
    assert book.on_event(event(kind="sensor_degraded", visibility_m=70.0, x=5700.0), NOW + 0.7) == 2
    assert [h.action_id.sequence_number for h in book.active(NOW + 0.7)] == [0, 1, 2]


def test_a_same_place_event_refreshes_the_validity_only_after_refresh_s() -> None:
    book = HazardBook(HazardPolicy(refresh_s=60.0))
    book.on_event(event(), NOW)
    book.due(NOW)
    book.on_event(event(), NOW + 59.0)
    assert book.active(NOW + 59.0)[0].reference_time == NOW
    book.on_event(event(), NOW + 61.0)
    assert book.active(NOW + 61.0)[0].reference_time == NOW + 61.0


def test_repetition_every_repetition_s_until_the_validity_runs_out() -> None:
    book = HazardBook(HazardPolicy(repetition_s=1.0, validity_s=10.0))
    book.on_event(event(), NOW)
    assert len(book.due(NOW)) == 1
    assert book.due(NOW + 0.5) == []
    again = book.due(NOW + 1.0)
    assert len(again) == 1 and again[0].reference_time == NOW  # a repetition is the same version
    assert len(book.due(NOW + 9.9)) == 1
    assert book.due(NOW + 10.0) == [] and book.active(NOW + 10.0) == []


def test_a_vehicle_passing_at_speed_cancels_a_queue_once() -> None:
    book = HazardBook()
    book.on_event(event(x=5900.0), NOW)
    book.due(NOW)
    p = book.policy
    assert book.on_telemetry(tel(5850.0, 30.0, NOW + 5), NOW + 5) == []  # before the spot
    assert book.on_telemetry(tel(5950.0, p.clear_speed_mps - 0.1, NOW + 5), NOW + 5) == []  # too slow
    assert book.on_telemetry(tel(5950.0, 30.0, NOW - 1), NOW + 5) == []  # older than the hazard
    assert book.on_telemetry(tel(5950.0, 30.0, NOW + 5, road="hw2"), NOW + 5) == []  # another road
    assert book.on_telemetry(tel(5900.0 + p.pass_m + 1, 30.0, NOW + 5), NOW + 5) == []  # too far past to tell
    assert book.on_telemetry(tel(5950.0, p.clear_speed_mps, NOW + 5), NOW + 5) == [0]
    assert book.active(NOW + 5) == []
    (cancel,) = book.due(NOW + 5)
    assert cancel.termination == "cancellation" and cancel.reference_time == NOW + 5
    assert book.due(NOW + 20) == []  # published once, then forgotten


def test_weather_is_not_cleared_by_traffic() -> None:
    assert CAUSES["adverseWeatherCondition-Visibility"] not in CLEARED_BY_TRAFFIC
    book = HazardBook()
    book.on_event(event(kind="sensor_degraded", visibility_m=70.0), NOW)
    assert book.on_telemetry(tel(5950.0, 30.0, NOW + 5), NOW + 5) == []
    assert len(book.active(NOW + 5)) == 1


def test_the_per_cell_rate_limit_holds_repetitions_back_new_versions_first() -> None:
    book = HazardBook(HazardPolicy(cell_burst=2, cell_rate_per_s=1.0, repetition_s=0.1, merge_m=1.0))
    for i in range(3):  # three actions sharing cells
        book.on_event(event(x=5900.0 + 10.0 * i), NOW)
    first = book.due(NOW)
    assert [h.action_id.sequence_number for h in first] == [0, 1]  # the bucket holds two
    assert book.due(NOW + 0.5) == []  # half a token: nothing
    assert [h.action_id.sequence_number for h in book.due(NOW + 1.0)] == [2]  # the unsent one before repetitions
    assert [h.action_id.sequence_number for h in book.due(NOW + 2.0)] == [0]
    sent = sum(len(book.due(NOW + 2.0 + 0.1 * k)) for k in range(1, 101))  # 10 s more at 1 msg/s per cell
    assert sent == 10


def test_the_rate_limit_counts_every_cell_a_version_goes_to_the_watch_horizon_included() -> None:
    book = HazardBook(HazardPolicy(cell_burst=1, cell_rate_per_s=0.001, merge_m=1.0))
    book.on_event(event(x=8000.0), NOW)  # no gap reported: the hazard is at the event's x
    (a,) = book.due(NOW)
    # a second action 2,500 m upstream: its area ends 2 cells before the first one's starts, inside its watch horizon
    book.on_event(event(x=5500.0), NOW)
    (b,) = [h for h in book.active(NOW) if h.action_id.sequence_number == 1]
    assert not set(b.relevance.cells) & set(a.relevance.cells)
    assert set(b.relevance.cells) & set(hazard_cells(a.relevance.cells, a.direction))
    assert hazard_cells(a.relevance.cells, a.direction)[0] == a.relevance.cells[0] - WATCH_CELLS
    assert book.due(NOW + 1.0) == []  # its cells' one token went to the first action's copies there
    book.on_event(event(x=500.0), NOW)  # far from both: its own cells, its own tokens
    assert [h.action_id.sequence_number for h in book.due(NOW + 1.0)] == [2]


def test_policy_is_validated() -> None:
    with pytest.raises(ConfigError, match="upstream_m"):
        HazardPolicy(upstream_m=0.0)
    with pytest.raises(ConfigError, match="cell_rate_per_s"):
        HazardPolicy(cell_rate_per_s=math.nan)
    with pytest.raises(ConfigError, match="cell_burst"):
        HazardPolicy(cell_burst=0)


def test_the_signing_key_is_private_and_stable(tmp_path) -> None:
    signer = load_signer(tmp_path / "hz")
    key = tmp_path / "hz" / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert public_key(tmp_path / "hz") == signer.public_bytes()
    again = load_signer(tmp_path / "hz")
    assert again.key_id == signer.key_id
    book = HazardBook()
    book.on_event(event(), NOW)
    assert HazardVerifier([public_key(tmp_path / "hz")]).verify(again.sign(book.due(NOW)[0]))
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_signer(tmp_path / "hz")
    with pytest.raises(ConfigError, match="no hazard signing key"):
        load_signer(tmp_path / "none", create=False)
    with pytest.raises(ConfigError, match="no hazard public key"):
        public_key(tmp_path / "none")


def test_read_active_without_a_service_is_empty(tmp_path) -> None:
    assert read_active(tmp_path) == []
    assert END_OF_QUEUE_ADVICE.speed_mps == pytest.approx(50 / 3.6)
