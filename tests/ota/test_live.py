"""The live view's pure state (``ota/live.py``): newest telemetry per vehicle, staleness, the vehicle bound,
hazards verified with the vehicles' own filter (expiry, cancellation, forgery, replay), bad input counted."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from driveloop.contracts.hazard import (
    CAUSES,
    ActionId,
    Hazard,
    HazardAdvisory,
    HazardSigner,
    encode_hazard,
    relevance_area,
)
from driveloop.contracts.stream import HAZARD_MAX_VALIDITY_S, Telemetry, encode, hazard_subject, telemetry_subject
from driveloop.core.exceptions import ConfigError
from driveloop.edge.hazards import MAX_CLOCK_SKEW_S
from driveloop.ota.live import LivePolicy, LiveView

CLOUD = HazardSigner(Ed25519PrivateKey.generate())
FORGER = HazardSigner(Ed25519PrivateKey.generate())
T0 = 1_900_000_000.0  # wall seconds


def tel(vid: str, seq: int, x_m: float, mode: str = "model", speed: float = 30.0) -> tuple[str, bytes]:
    t = Telemetry(vehicle_id=vid, seq=seq, t_s=seq * 0.1, wall_ts=T0, x_m=x_m, y_m=0.0, lane=1, speed_mps=speed,
                  accel_mps2=0.0, mode=mode)  # type: ignore[arg-type]
    return telemetry_subject(vid), encode(t)


def hazard(seq: int = 1, x_m: float = 1200.0, ref: float = T0, validity_s: float = 120.0,
           termination: str | None = None, direction: str = "increasing") -> Hazard:
    return Hazard(action_id=ActionId(station_id="cloud", sequence_number=seq), detection_time=min(ref, T0) - 1.0,
                  reference_time=ref, validity_s=validity_s, termination=termination,  # type: ignore[arg-type]
                  cause=CAUSES["dangerousEndOfQueue"], road="hw1", x_m=x_m, direction=direction,  # type: ignore[arg-type]
                  relevance=relevance_area("hw1", x_m, direction, 600.0, 50.0),  # type: ignore[arg-type]
                  advisory=HazardAdvisory(speed_mps=15.0))


def sent(h: Hazard, signer: HazardSigner | None = CLOUD) -> tuple[str, bytes]:
    signed = signer.sign(h) if signer is not None else h
    return hazard_subject(h.road, h.relevance.cells[0]), encode_hazard(signed)


def view(**kw: float) -> LiveView:
    return LiveView(LivePolicy(**kw), (CLOUD.public_bytes(),))  # type: ignore[arg-type]


def test_newest_telemetry_per_vehicle_wins() -> None:
    v = view()
    assert v.on_telemetry(*tel("veh-001", 5, 100.0), T0) == "accepted"
    assert v.on_telemetry(*tel("veh-001", 4, 90.0), T0) == "old"  # a redelivery of an older message
    assert v.on_telemetry(*tel("veh-001", 5, 95.0), T0) == "old"  # a replay of the same seq
    assert v.on_telemetry(*tel("veh-001", 6, 103.0, mode="fallback"), T0) == "accepted"
    rows = v.snapshot(T0 + 0.5)["vehicles"]
    assert [(r["vehicle_id"], r["x_m"], r["mode"], r["seq"], r["age_s"]) for r in rows] == \
        [("veh-001", 103.0, "fallback", 6, 0.5)]
    assert v.telemetry_counts == {"accepted": 2, "old": 2}


def test_stale_vehicles_are_dropped_by_the_servers_clock() -> None:
    v = view(stale_after_s=10.0)
    v.on_telemetry(*tel("veh-001", 1, 0.0), T0)
    v.on_telemetry(*tel("veh-002", 1, 0.0), T0 + 5.0)
    assert [r["vehicle_id"] for r in v.snapshot(T0 + 10.0)["vehicles"]] == ["veh-001", "veh-002"]  # at the limit
    snap = v.snapshot(T0 + 10.01)
    assert [r["vehicle_id"] for r in snap["vehicles"]] == ["veh-002"]
    assert snap["counts"]["stale_dropped"] == 1
    assert v.snapshot(T0 + 15.01)["vehicles"] == []


def test_the_vehicle_bound_refuses_newcomers_until_one_goes_stale() -> None:
    v = view(max_vehicles=2, stale_after_s=10.0)
    assert v.on_telemetry(*tel("veh-001", 1, 0.0), T0) == "accepted"
    assert v.on_telemetry(*tel("veh-002", 1, 0.0), T0 + 8.0) == "accepted"
    assert v.on_telemetry(*tel("veh-003", 1, 0.0), T0 + 9.0) == "over_capacity"
    assert v.on_telemetry(*tel("veh-002", 2, 5.0), T0 + 9.0) == "accepted"  # a known vehicle still updates
    assert v.on_telemetry(*tel("veh-003", 2, 0.0), T0 + 11.0) == "accepted"  # veh-001 went stale: room
    assert [r["vehicle_id"] for r in v.snapshot(T0 + 11.0)["vehicles"]] == ["veh-002", "veh-003"]
    assert v.telemetry_counts["over_capacity"] == 1


BAD_TELEMETRY = {
    "not json": ("tel.veh-001", b"{nope"),
    "subject names another vehicle": ("tel.veh-002", tel("veh-001", 1, 0.0)[1]),
    "unknown field": ("tel.veh-001", tel("veh-001", 1, 0.0)[1][:-1] + b',"extra":1}'),
    "infinite position": ("tel.veh-001", tel("veh-001", 1, 0.0)[1].replace(b'"x_m":0.0', b'"x_m":1e999')),
    "oversized": ("tel.veh-001", b"{" + b" " * 5000 + b"}"),
}


@pytest.mark.parametrize("name", BAD_TELEMETRY)
def test_bad_telemetry_is_dropped_and_counted(name: str) -> None:
    v = view()
    assert v.on_telemetry(*BAD_TELEMETRY[name], T0) == "malformed"
    assert v.snapshot(T0)["vehicles"] == [] and v.telemetry_counts == {"malformed": 1}


def test_a_signed_hazard_is_shown_with_cause_area_and_remaining_validity() -> None:
    v = view()
    assert v.on_hazard(*sent(hazard(validity_s=120.0)), T0 + 1.0) == "accepted"
    assert v.on_hazard(*sent(hazard(validity_s=120.0)), T0 + 1.5) == "replayed"  # the same copy on another cell
    [row] = v.snapshot(T0 + 20.0)["hazards"]
    assert (row["action"], row["cause_name"], row["x_m"], row["from_x_m"], row["to_x_m"]) == \
        ("cloud/1", "dangerousEndOfQueue", 1200.0, 600.0, 1250.0)
    assert (row["remaining_s"], row["advisory_speed_mps"]) == (100.0, 15.0)


@pytest.mark.parametrize(("name", "message", "verdict"), [
    ("unsigned", sent(hazard(), signer=None), "unsigned"),
    ("forged", sent(hazard(), signer=FORGER), "bad_signature"),
    ("tampered", (sent(hazard())[0], sent(hazard())[1].replace(b'"x_m":1200.0', b'"x_m":1201.0', 1)),
     "bad_signature"),
    ("expired", sent(hazard(ref=T0 - 200.0, validity_s=120.0)), "expired"),
    ("from the future", sent(hazard(ref=T0 + MAX_CLOCK_SKEW_S + 5.0)), "future"),
    ("wrong cell", ("haz.hw1.40", sent(hazard())[1]), "malformed"),
    ("garbage", ("haz.hw1.4", b"\xff\x00"), "malformed"),
])
def test_bad_hazards_are_dropped_and_counted(name: str, message: tuple[str, bytes], verdict: str) -> None:
    v = view()
    assert v.on_hazard(*message, T0) == verdict
    snap = v.snapshot(T0)
    assert snap["hazards"] == [] and snap["counts"]["hazards"] == {verdict: 1}


def test_hazards_of_both_directions_are_shown() -> None:
    v = view()
    assert v.on_hazard(*sent(hazard(seq=1, direction="increasing")), T0) == "accepted"
    assert v.on_hazard(*sent(hazard(seq=2, direction="decreasing")), T0) == "accepted"
    assert sorted(r["direction"] for r in v.snapshot(T0)["hazards"]) == ["decreasing", "increasing"]


def test_expiry_and_cancellation_remove_a_hazard_for_good() -> None:
    v = view()
    v.on_hazard(*sent(hazard(seq=1, validity_s=60.0)), T0)
    v.on_hazard(*sent(hazard(seq=2, validity_s=600.0)), T0)
    assert [r["action"] for r in v.snapshot(T0 + 59.0)["hazards"]] == ["cloud/1", "cloud/2"]
    assert [r["action"] for r in v.snapshot(T0 + 60.0)["hazards"]] == ["cloud/2"]  # validity over
    assert v.on_hazard(*sent(hazard(seq=2, ref=T0 + 70.0, termination="cancellation")), T0 + 70.0) == "terminated"
    assert v.snapshot(T0 + 70.0)["hazards"] == []
    assert v.on_hazard(*sent(hazard(seq=2, validity_s=600.0)), T0 + 71.0) == "cancelled_action"  # replayed live copy
    assert v.snapshot(T0 + 71.0)["hazards"] == []


def test_terminated_actions_are_forgotten_once_no_copy_can_be_live() -> None:
    v = view()
    v.on_hazard(*sent(hazard(seq=1)), T0)
    v.on_hazard(*sent(hazard(seq=1, ref=T0 + 1.0, termination="cancellation")), T0 + 1.0)
    assert v._filter is not None
    v.snapshot(T0 + 1.0 + HAZARD_MAX_VALIDITY_S)
    assert len(v._filter._actions) == 1  # a copy issued before the cancellation could still be valid
    v.snapshot(T0 + 1.0 + HAZARD_MAX_VALIDITY_S + MAX_CLOCK_SKEW_S + 1.0)
    assert v._filter._actions == {}
    assert v.on_hazard(*sent(hazard(seq=1)), T0 + 2000.0) == "expired"  # its replay is still refused


def test_at_most_max_hazards_are_shown_the_longest_valid_kept() -> None:
    v = view(max_hazards=2)
    for seq, validity in ((1, 100.0), (2, 300.0), (3, 200.0)):
        v.on_hazard(*sent(hazard(seq=seq, x_m=1000.0 + seq, validity_s=validity)), T0)
    assert [r["action"] for r in v.snapshot(T0)["hazards"]] == ["cloud/2", "cloud/3"]


def test_without_a_hazard_key_every_hazard_is_unverifiable() -> None:
    v = LiveView(LivePolicy(), ())
    assert v.on_hazard(*sent(hazard()), T0) == "unverifiable"
    snap = v.snapshot(T0)
    assert snap["hazards"] == [] and snap["hazard_verification"] is False
    assert snap["counts"]["hazards"] == {"unverifiable": 1}


@pytest.mark.parametrize("kw", [{"max_vehicles": 0}, {"max_hazards": 0}, {"stale_after_s": 0.0},
                                {"stale_after_s": float("nan")}])
def test_bad_policy_is_a_config_error(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        LivePolicy(**kw)  # type: ignore[arg-type]
