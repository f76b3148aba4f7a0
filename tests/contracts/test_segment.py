"""Segment contract: round trip, validation of every kind of bad file (fuzzed), directory scan."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mcap.reader import make_reader
from mcap.writer import Writer

from driveloop.contracts.observation import GRID_H, GRID_W, KIN_DIM, LIDAR_CELLS
from driveloop.contracts.segment import (
    METADATA_NAME,
    SCHEMAS,
    TICK_TOPICS,
    TOPIC_EVENT,
    TOPICS,
    SegmentMeta,
    TickRecord,
    decode_tick,
    encode_tick,
    read_events,
    read_ticks,
    scan_directory,
    schema_bytes,
    validate_segment,
    validate_segment_bytes,
)
from driveloop.edge.spool import Spool
from driveloop.edge.triggers import SIGNAL_NAMES
from driveloop.sim.scenarios import ENVIRONMENT_SIGNALS
from driveloop.core.exceptions import SegmentError

DT_S = 0.1


def make_tick(i: int, rng: np.random.Generator, *, brake: bool = False, fallback: bool = False,
              t0_s: float = 0.0) -> TickRecord:
    """A synthetic but contract-shaped tick; ``brake``/``fallback`` make built-in triggers fire."""
    grid = np.stack([rng.uniform(0, 1, (GRID_H, GRID_W)), rng.normal(0, 5, (GRID_H, GRID_W))]).astype(np.float32)
    has_model = i % 7 != 3
    return TickRecord(
        t_s=round(t0_s + i * DT_S, 6), tick=i,
        kinematics=rng.normal(0, 10, KIN_DIM).astype(np.float32),
        lidar=rng.uniform(0, 80, (2, LIDAR_CELLS)).astype(np.float32),
        grid=grid,
        model_action=[float(rng.normal()), float(rng.normal(0, 0.05))] if has_model else None,
        model_confidence=float(rng.uniform(0.5, 1.0)) if has_model else None,
        model_latency_ms=float(rng.uniform(0.02, 0.2)),
        model_valid=has_model,
        applied_accel_mps2=-6.0 if brake else float(rng.uniform(-1, 1)),
        applied_steering_rad=float(rng.normal(0, 0.02)),
        source="fallback" if fallback else "model",
        fcw=brake, aeb=brake, watchdog="deadline_miss" if fallback else None,
        activation=fallback, reason="aeb" if brake else None,
        ttc_s=float(rng.uniform(2, 10)) if i % 2 else None,
        state={"t_s": round(t0_s + i * DT_S, 6), "ego": {"id": 0, "x_m": i * 3.0, "vx_mps": 25.0},
               "speed_mps": 25.0 + i % 3, "others": [{"id": 1, "x_m": 40.0}] if i % 3 else [],
               "crashed": False},
        expert_action=[0.1, -0.01] if i % 5 else None,
    )


def record_segment(spool_root: Path, n: int, seed: int = 0, **kw: object) -> tuple[Path, list[TickRecord]]:
    """Record ``n`` ticks into one segment; return its path and the ticks."""
    from driveloop.edge.recorder import Recorder

    rng = np.random.default_rng(seed)
    ticks = [make_tick(i, rng, **kw) for i in range(n)]  # type: ignore[arg-type]
    with Recorder(Spool(spool_root, 10**9), "veh-1", "highway", seed, "1", segment_max_s=1e3) as rec:
        for t in ticks:
            rec.record(t)
    assert len(rec.closed) == 1
    return rec.closed[0], ticks


def assert_tick_equal(a: TickRecord, b: TickRecord) -> None:
    assert (a.t_s, a.tick, a.model_valid, a.source, a.fcw, a.aeb, a.watchdog, a.activation, a.reason) == \
           (b.t_s, b.tick, b.model_valid, b.source, b.fcw, b.aeb, b.watchdog, b.activation, b.reason)
    np.testing.assert_array_equal(a.kinematics, b.kinematics)  # lossless
    np.testing.assert_array_equal(a.lidar, b.lidar)
    np.testing.assert_allclose(a.grid[0], b.grid[0], atol=0.5 / 255 + 1e-6)  # uint8 occupancy
    np.testing.assert_allclose(a.grid[1], b.grid[1], atol=0.005 + 1e-4)  # 0.01 m/s speed
    assert a.model_action == b.model_action and a.model_confidence == b.model_confidence
    assert a.applied_accel_mps2 == b.applied_accel_mps2 and a.applied_steering_rad == b.applied_steering_rad
    assert a.model_latency_ms == b.model_latency_ms and a.ttc_s == b.ttc_s
    assert a.state == b.state and a.expert_action == b.expert_action


def test_round_trip_equal(tmp_path: Path) -> None:
    path, ticks = record_segment(tmp_path, 30)
    info = validate_segment(path)
    m = info.meta
    assert (m.vehicle, m.scenario, m.seed, m.model_version) == ("veh-1", "highway", 0, "1")
    assert (m.n_ticks, m.start_s, m.end_s) == (30, 0.0, 2.9)
    assert info.n_messages == 30 * 6 and m.events == {} and not m.has_event and m.priority == 0
    assert len(info.sha256) == 64 and info.size == path.stat().st_size
    back = list(read_ticks(path))
    assert len(back) == 30
    for a, b in zip(ticks, back):
        assert_tick_equal(a, b)


def test_non_finite_values_become_nan(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    t = make_tick(0, rng)
    t.kinematics[3] = np.nan
    t.lidar[0, 0] = np.inf
    t.grid[1, 2, 3] = np.nan
    from driveloop.edge.recorder import Recorder

    with Recorder(Spool(tmp_path, 10**9), "v", "s", 0, "1") as rec:
        rec.record(TickRecord(**{**t.__dict__, "model_confidence": math.nan, "ttc_s": math.inf}))
    back = next(read_ticks(rec.closed[0]))
    assert math.isnan(back.kinematics[3]) and math.isnan(back.lidar[0, 0]) and math.isnan(back.grid[1, 2, 3])
    assert np.isfinite(np.delete(back.grid.ravel(), 1 * 512 + 2 * 32 + 3)).all()
    assert back.model_confidence is None and back.ttc_s is None


def test_zstd_chunks_and_foxglove_style_reader(tmp_path: Path) -> None:
    path, _ = record_segment(tmp_path, 40)
    with open(path, "rb") as f:
        reader = make_reader(f)
        summary = reader.get_summary()
        assert summary is not None and summary.chunk_indexes
        assert {c.compression for c in summary.chunk_indexes} == {"zstd"}
        assert sum(c.compressed_size for c in summary.chunk_indexes) < sum(c.uncompressed_size for c in summary.chunk_indexes)
        topics = {ch.topic: summary.schemas[ch.schema_id].name for ch in summary.channels.values()}
        assert topics == {t: SCHEMAS[t][0] for t in TOPICS}
        (meta,) = [m for m in reader.iter_metadata() if m.name == METADATA_NAME]
        assert meta.metadata["vehicle"] == "veh-1"
        n = sum(1 for _ in reader.iter_messages())
    assert n == 40 * 6


def test_signals_cover_trigger_names() -> None:
    t = make_tick(2, np.random.default_rng(0), brake=True, fallback=True)
    sig = t.signals()
    # the tick gives every signal but the environment's, which the recorder adds from its scenario
    assert set(sig) == SIGNAL_NAMES - set(ENVIRONMENT_SIGNALS) and ENVIRONMENT_SIGNALS
    assert (sig["speed"], sig["accel"], sig["fallback"], sig["aeb"], sig["watchdog"]) == (27.0, -6.0, True, True, True)
    assert sig["ttc"] == math.inf and not sig["collision"]
    no_model = make_tick(3, np.random.default_rng(0))
    assert math.isnan(no_model.signals()["confidence"]) and no_model.signals()["ttc"] < 10
    crashed = TickRecord(**{**t.__dict__, "state": {"crashed": True}})
    assert crashed.signals()["collision"] and crashed.signals()["speed"] == float(t.kinematics[0])


@pytest.mark.parametrize("bad", [
    {"kinematics": np.zeros(5, np.float32)}, {"lidar": np.zeros((32, 2), np.float32)},
    {"source": "autopilot"}, {"t_s": math.nan}, {"tick": -1}, {"model_action": [1.0]},
])
def test_tick_record_rejects_bad_fields(bad: dict[str, object]) -> None:
    base = make_tick(0, np.random.default_rng(0)).__dict__
    with pytest.raises(SegmentError):
        TickRecord(**{**base, **bad})


def _write_foreign(path: Path, *, topic_schema: str = "other.Thing", metadata: bool = True) -> None:
    """A valid, finalized MCAP that is not a driveloop segment (wrong schema)."""
    with open(path, "wb") as f:
        w = Writer(f, enable_data_crcs=True)
        w.start("driveloop", "test")
        for topic in TOPICS:
            sid = w.register_schema(topic_schema if topic == TOPIC_EVENT else SCHEMAS[topic][0], "jsonschema",
                                    schema_bytes(topic))
            w.register_channel(topic, "json", sid)
        if metadata:
            w.add_metadata(METADATA_NAME, SegmentMeta("v", "s", 0, "1", 0.0, 0.0, 0, {}, False, 0, 0.0).to_record())
        w.finish()


def test_corruption_table(tmp_path: Path) -> None:
    good, _ = record_segment(tmp_path / "spool", 25, brake=True)
    data = good.read_bytes()
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    cases: dict[str, bytes] = {
        "empty": b"",
        "not_mcap": b"hello world, this is not an MCAP file at all" * 3,
        "only_magic": data[:8],
        "no_footer": data[:-37],
        "truncated_last_byte": data[:-1],
        "truncated_half": data[: len(data) // 2],
        "truncated_header": data[:20],
        "bit_flip_middle": data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0x10]) + data[len(data) // 2 + 1:],
        "bit_flip_summary": data[:-60] + bytes([data[-60] ^ 0x01]) + data[-59:],
        "garbage_appended": data + b"\0\0\0",
    }
    for name, blob in cases.items():
        (bad_dir / f"{name}.mcap").write_bytes(blob)
    _write_foreign(bad_dir / "wrong_schema.mcap")
    (bad_dir / "good.mcap").write_bytes(data)
    for name in [*cases, "wrong_schema"]:
        with pytest.raises(SegmentError) as ei:
            validate_segment(bad_dir / f"{name}.mcap")
        assert str(bad_dir / f"{name}.mcap") in str(ei.value), name
    with pytest.raises(SegmentError, match="wrong schema"):
        validate_segment(bad_dir / "wrong_schema.mcap")
    with pytest.raises(SegmentError, match="empty"):
        validate_segment(bad_dir / "empty.mcap")
    with pytest.raises(SegmentError):
        list(read_ticks(bad_dir / "truncated_half.mcap"))
    report = scan_directory(bad_dir)
    assert [i.path.name for i in report.valid] == ["good.mcap"]
    assert sorted(p.name for p, _ in report.rejected) == sorted(f"{n}.mcap" for n in [*cases, "wrong_schema"])
    assert read_events(bad_dir / "good.mcap")[0]["trigger"] in {"hard_brake", "low_ttc"}


def test_bytes_core_gives_what_the_file_wrapper_gives(tmp_path: Path) -> None:
    """``validate_segment`` is ``validate_segment_bytes`` on the file's bytes, plus the path."""
    path, _ = record_segment(tmp_path / "spool", 25, brake=True)
    from_bytes = validate_segment_bytes(path.read_bytes())
    from_file = validate_segment(path)
    assert from_bytes.path is None and from_file.path == path
    assert replace(from_bytes, path=path) == from_file
    assert from_bytes.meta.has_event and from_bytes.meta.events and from_bytes.meta.n_ticks == 25


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1:]


# name, how the good bytes are damaged, what the error says (None: any SegmentError)
BYTES_REJECT_CASES: list[tuple[str, Callable[[bytes], bytes], str | None]] = [
    ("empty", lambda d: b"", "empty file"),
    ("not_mcap", lambda d: b"hello world, not an MCAP file" * 3, "bad magic"),
    ("only_magic", lambda d: d[:8], "no footer"),  # starts and ends with the magic, nothing between
    ("truncated_half", lambda d: d[: len(d) // 2], "no closing magic"),
    ("truncated_last_byte", lambda d: d[:-1], "no closing magic"),
    ("head_and_tail_only", lambda d: d[:64] + d[-64:], None),
    ("garbled_middle", lambda d: _flip(d, len(d) // 2), None),
    ("garbled_summary", lambda d: _flip(d, len(d) - 60), None),
    ("garbage_appended", lambda d: d + b"\0\0\0", "no closing magic"),
]


@pytest.mark.parametrize("name,damage,message", BYTES_REJECT_CASES, ids=[c[0] for c in BYTES_REJECT_CASES])
def test_bytes_core_rejects_damaged_bytes(tmp_path: Path, small_segment: bytes, name: str,
                                          damage: Callable[[bytes], bytes], message: str | None) -> None:
    """Damaged bytes raise SegmentError with the same message as the file check, less the path prefix."""
    blob = damage(small_segment)
    with pytest.raises(SegmentError) as from_bytes:
        validate_segment_bytes(blob)
    if message is not None:
        assert message in str(from_bytes.value)
    target = tmp_path / f"{name}.mcap"
    target.write_bytes(blob)
    with pytest.raises(SegmentError) as from_file:
        validate_segment(target)
    assert str(from_file.value) == f"{target}: {from_bytes.value}"


def test_bytes_core_keeps_the_size_limit(small_segment: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    import driveloop.contracts.segment as segment

    monkeypatch.setattr(segment, "MAX_SEGMENT_BYTES", len(small_segment) - 1)
    with pytest.raises(SegmentError, match=f"{len(small_segment)} bytes exceeds the"):
        validate_segment_bytes(small_segment)


def test_fuzz_bit_flips_and_truncations_only_raise_segment_error(tmp_path: Path) -> None:
    good, _ = record_segment(tmp_path / "spool", 6, brake=True, fallback=True)
    data = good.read_bytes()
    rng = random.Random(1234)  # fixed seed: replayable
    target = tmp_path / "fuzz.mcap"
    positions = list(range(64)) + list(range(len(data) - 200, len(data))) + rng.sample(range(len(data)), 200)
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(flipped))
        with pytest.raises(SegmentError):
            validate_segment(target)
    for cut in sorted(rng.sample(range(1, len(data)), 100)):
        target.write_bytes(data[:cut])
        with pytest.raises(SegmentError):
            validate_segment(target)


def test_tampered_metadata_counts_rejected(tmp_path: Path) -> None:
    """A well-formed MCAP whose metadata lies about its contents is rejected."""
    path, _ = record_segment(tmp_path / "spool", 5)
    with open(path, "rb") as f:
        reader = make_reader(f)
        msgs = [(ch.topic, m.log_time, m.data) for _, ch, m in reader.iter_messages()]
        (meta,) = list(reader.iter_metadata())
    forged = dict(meta.metadata, n_ticks="6", events=json.dumps({"hard_brake": 1}))
    out = tmp_path / "forged.mcap"
    with open(out, "wb") as f:
        w = Writer(f, enable_data_crcs=True)
        w.start("driveloop", "test")
        ids = {t: w.register_channel(t, "json", w.register_schema(SCHEMAS[t][0], "jsonschema", schema_bytes(t)))
               for t in TOPICS}
        for topic, log_time, payload in msgs:
            w.add_message(ids[topic], log_time, payload, log_time)
        w.add_metadata(METADATA_NAME, forged)
        w.finish()
    with pytest.raises(SegmentError, match="n_ticks"):
        validate_segment(out)


# ---------------------------------------------------------------- properties


@settings(max_examples=60, derandomize=True, deadline=None)
@given(kin=hnp.arrays(np.float32, (KIN_DIM,), elements=st.floats(width=32)),
       lidar=hnp.arrays(np.float32, (2, LIDAR_CELLS), elements=st.floats(width=32)))
def test_sensor_arrays_round_trip_bit_exact(kin: np.ndarray, lidar: np.ndarray) -> None:
    base = make_tick(1, np.random.default_rng(0))
    rec = TickRecord(**{**base.__dict__, "kinematics": kin, "lidar": lidar})
    back = decode_tick({t: json.loads(b) for t, b in encode_tick(rec).items() if t in TICK_TOPICS})
    finite = np.isfinite(kin)
    np.testing.assert_array_equal(back.kinematics[finite], kin[finite])
    assert np.isnan(back.kinematics[~finite]).all()
    np.testing.assert_array_equal(np.isfinite(back.lidar), np.isfinite(lidar))
    np.testing.assert_array_equal(back.lidar[np.isfinite(lidar)], lidar[np.isfinite(lidar)])


@pytest.fixture(scope="module")
def small_segment(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path, _ = record_segment(tmp_path_factory.mktemp("seg"), 4, brake=True)
    return path.read_bytes()


@settings(max_examples=150, derandomize=True, deadline=None)
@given(data=st.data())
def test_any_edit_is_rejected_with_segment_error(small_segment: bytes, data: st.DataObject, tmp_path_factory: pytest.TempPathFactory) -> None:
    blob = bytearray(small_segment)
    pos = data.draw(st.integers(0, len(blob) - 1))
    kind = data.draw(st.sampled_from(["flip", "insert", "delete", "overwrite"]))
    if kind == "flip":
        blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "insert":
        blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        del blob[pos:pos + data.draw(st.integers(1, 64))]
    else:
        new = data.draw(st.binary(min_size=1, max_size=8))
        if bytes(blob[pos:pos + len(new)]) == new[: len(blob) - pos]:
            return  # not an edit
        blob[pos:pos + len(new)] = new
    target = tmp_path_factory.mktemp("edit") / "x.mcap"
    target.write_bytes(bytes(blob))
    with pytest.raises(SegmentError):
        validate_segment(target)
