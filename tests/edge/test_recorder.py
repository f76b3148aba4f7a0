"""Recorder: rollover, event flagging and windows, quota, crash safety (SIGKILL), real Ray reading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from mcap.reader import make_reader

from driveloop.edge.recorder import Recorder
from driveloop.contracts.segment import (
    PART_SUFFIX,
    TICK_TOPICS,
    TOPIC_EVENT,
    TickRecord,
    decode_grid,
    read_ticks,
    scan_directory,
    validate_segment,
)
from driveloop.edge.spool import Spool
from driveloop.edge.triggers import TriggerSpec, builtin_triggers
from driveloop.core.exceptions import ConfigError, SegmentError
from tests.contracts.test_segment import assert_tick_equal, make_tick

REPO = Path(__file__).resolve().parents[2]


def _drive(rec: Recorder, seconds: float, brake_at_s: tuple[float, ...] = (), seed: int = 0,
           first_tick: int = 0) -> list:
    rng = np.random.default_rng(seed)
    ticks = []
    for i in range(first_tick, first_tick + round(seconds * 10)):
        t = make_tick(i, rng, brake=any(abs(i * 0.1 - b) < 1e-6 for b in brake_at_s))
        rec.record(t)
        ticks.append(t)
    return ticks


def test_rollover_at_20_s_and_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**9)
    with Recorder(spool, "car-1", "highway", 7, "3", triggers=[]) as rec:
        ticks = _drive(rec, 45.0)
    infos = [validate_segment(p) for p in rec.closed]
    metas = [i.meta for i in infos]
    assert [m.n_ticks for m in metas] == [200, 200, 50]
    assert [(m.start_s, m.end_s) for m in metas] == [(0.0, 19.9), (20.0, 39.9), (40.0, 44.9)]
    assert all(m.end_s - m.start_s < 20.0 for m in metas)
    assert {(m.vehicle, m.scenario, m.seed, m.model_version) for m in metas} == {("car-1", "highway", 7, "3")}
    back = [t for p in rec.closed for t in read_ticks(p)]
    assert len(back) == len(ticks)
    for a, b in zip(ticks, back):
        assert_tick_equal(a, b)
    assert list(spool.open_dir.iterdir()) == []


WINDOWS = [
    # (name, brake time, spool priority per 2 s segment)
    ("inside", 4.5, [0, 3, 3, 0, 0]),  # pre-window (1 s) reaches back into the previous segment
    ("post_window_spills", 5.9, [0, 0, 3, 3, 0]),
    ("first_segment", 0.5, [3, 0, 0, 0, 0]),
]


@pytest.mark.parametrize("name,brake_s,priorities", WINDOWS, ids=[w[0] for w in WINDOWS])
def test_event_segments_flagged_with_windows(tmp_path: Path, name: str, brake_s: float, priorities: list[int]) -> None:
    spool = Spool(tmp_path, 10**9)
    trig = [TriggerSpec("hard_brake", "accel < -4", pre_s=1.0, post_s=1.0, priority=3)]
    with Recorder(spool, "car-1", "cut-in", 1, "1", segment_max_s=2.0, triggers=trig) as rec:
        _drive(rec, 10.0, brake_at_s=(brake_s,))
    by_start = sorted(spool.closed_segments(), key=lambda e: e.opened_ns)
    assert [e.priority for e in by_start] == priorities
    assert rec.closed == [e.path for e in by_start]  # current names, after any promotion
    infos = [validate_segment(e.path) for e in by_start]
    hit = int(brake_s // 2)
    assert [i.meta.events for i in infos] == [{"hard_brake": 1} if k == hit else {} for k in range(5)]
    assert infos[hit].meta.has_event and infos[hit].meta.priority == 3
    (ev,) = [m for m in _events(by_start[hit].path)]
    assert ev["trigger"] == "hard_brake" and abs(ev["t_s"] - brake_s) < 1e-9
    assert spool.closed_segments()[0].priority == 3  # events upload first


def _events(path: Path) -> list[dict]:
    from driveloop.contracts.segment import read_events

    return read_events(path)


def test_campaign_triggers_run_next_to_builtins(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**9)
    with Recorder(spool, "car", "merge", 0, "1", segment_max_s=1.0) as rec:
        _drive(rec, 1.0)
        campaign = TriggerSpec("campaign.fast", "speed > 26", mode="always", min_interval_s=0.25, priority=6)
        rec.set_campaign_triggers([campaign])
        with pytest.raises(ConfigError):
            rec.set_campaign_triggers([TriggerSpec("campaign.bad", "nope > 1")])
        assert [s.name for s in rec.triggers.specs] == [*(s.name for s in builtin_triggers()), "campaign.fast"]
        _drive(rec, 2.0, first_tick=10)  # make_tick: speed 27 on every third tick (i % 3 == 2)
    infos = [validate_segment(p) for p in rec.closed]  # closed follows the promotion's rename
    assert [i.meta.events.get("campaign.fast", 0) for i in infos] == [0, 3, 4]  # ticks 11,14,17 | 20,23,26,29
    assert [i.meta.priority for i in infos] == [0, 6, 6]  # what happened inside each segment
    assert [e.priority for e in sorted(spool.closed_segments(), key=lambda e: e.opened_ns)] == [6, 6, 6]


def test_builtin_triggers_and_quota_keep_event_segments(tmp_path: Path) -> None:
    probe = Spool(tmp_path / "probe", 10**9)
    with Recorder(probe, "car", "dense", 0, "1", segment_max_s=2.0) as rec:
        _drive(rec, 2.0)
    seg_bytes = rec.closed[0].stat().st_size
    spool = Spool(tmp_path / "spool", int(seg_bytes * 3.5))
    with Recorder(spool, "car", "dense", 0, "1", segment_max_s=2.0) as rec:
        _drive(rec, 20.0, brake_at_s=(2.5, 14.5))  # built-in hard_brake: pre 5 s, post 5 s
    left = spool.closed_segments()
    assert rec.evicted and spool.usage_bytes() <= spool.quota_bytes
    assert all(e.has_event for e in left)
    counts = Counter(k for e in left for k in validate_segment(e.path).meta.events)
    assert counts["hard_brake"] >= 1


def test_complete_leftover_part_is_recovered_on_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**9)
    rec = Recorder(spool, "car-9", "highway", 0, "1", verify=False)
    _drive(rec, 1.0)
    seg = rec._seg
    rec._finish(seg)  # as if killed after finishing the file, before the rename
    again = Recorder(spool, "car-9", "highway", 0, "1")
    assert again.quarantined == [] and [p.name for p in again.recovered] == [
        spool.closed_path("car-9", seg.opened_ns, 0).name]
    assert validate_segment(again.recovered[0]).meta.n_ticks == 10


def test_leftover_part_is_quarantined_on_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**9)
    rec = Recorder(spool, "car-9", "highway", 0, "1")
    _drive(rec, 1.0)
    part = rec._seg.part  # the open segment, as a crash would leave it
    rec._seg.file.flush()
    again = Recorder(spool, "car-9", "highway", 0, "1")
    assert [p.name for p in again.quarantined] == [part.name] and not part.exists()
    assert spool.closed_segments() == []


def test_recorder_errors(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**9)
    with pytest.raises(ConfigError):
        Recorder(spool, "car", "s", 0, "1", segment_max_s=0.0)
    with pytest.raises(ConfigError):
        Recorder(spool, "bad/id", "s", 0, "1")
    for bad_version in ("fleet", "v1", "0", "99999999999999999999999"):  # checked before any segment exists
        with pytest.raises(ConfigError, match="model version"):
            Recorder(spool, "car", "s", 0, bad_version)
    assert Recorder(spool, "car", "s", 0, 3).model_version == "3"  # the manifest's int, as metadata text
    with pytest.raises(ConfigError):
        Recorder(spool, "car", "s", 0, "1", triggers=[TriggerSpec("x", "nonexistent > 1")])
    rec = Recorder(spool, "car", "s", 0, "1")
    t = make_tick(3, np.random.default_rng(0))
    with pytest.raises(SegmentError, match="JSON-safe"):
        rec.record(TickRecord(**{**t.__dict__, "state": {"obj": object()}}))
    assert rec._seg is None and list(spool.open_dir.iterdir()) == []  # a bad tick changes nothing
    rec.record(t)
    with pytest.raises(SegmentError, match="does not advance"):
        rec.record(t)
    rec.close()
    with pytest.raises(SegmentError, match="closed"):
        rec.record(make_tick(4, np.random.default_rng(0)))
    assert rec.close() == rec.closed and len(rec.closed) == 1


# The recorder process SIGKILLs itself at an exact point: 4 segments of 10 ticks closed, 5 ticks into
# the 5th; with "finished-not-published", that 5th segment was completed on disk but not yet published.
_CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from driveloop.edge.recorder import Recorder
    from driveloop.edge.spool import Spool
    from tests.contracts.test_segment import make_tick

    rec = Recorder(Spool(sys.argv[1], 10**9), "victim", "highway", 0, "1", segment_max_s=1.0)
    rng = np.random.default_rng(0)
    for i in range(45):
        rec.record(make_tick(i, rng, brake=i % 25 == 0))
    if sys.argv[2] == "finished-not-published":
        rec._finish(rec._seg)
    os.kill(os.getpid(), signal.SIGKILL)
""")
KILL_POINTS = [("mid-segment", 0), ("finished-not-published", 1)]  # (where it dies, complete leftovers)


def _killed(root: Path, where: str) -> Spool:
    """A spool whose recorder process was SIGKILLed at ``where`` (see _CHILD)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root), where], cwd=REPO, env=env, check=False)
    assert proc.returncode == -signal.SIGKILL
    return Spool(root, 10**9)


@pytest.fixture(scope="module")
def killed_spool(tmp_path_factory: pytest.TempPathFactory) -> Spool:
    return _killed(tmp_path_factory.mktemp("killed"), "mid-segment")


@pytest.mark.parametrize("where,complete", KILL_POINTS, ids=[k[0] for k in KILL_POINTS])
def test_sigkill_loses_only_the_open_segment(tmp_path: Path, where: str, complete: int) -> None:
    killed_spool = _killed(tmp_path, where)
    closed = sorted(killed_spool.closed_dir.iterdir())
    assert len(closed) == 4 and all(p.name.endswith(".mcap") for p in closed)
    parts = list(killed_spool.open_dir.iterdir())
    assert len(parts) == 1 and parts[0].name.endswith(PART_SUFFIX)  # the open segment, and only it
    for p in closed:
        info = validate_segment(p)
        assert info.meta.n_ticks == 10 and info.meta.vehicle == "victim"
        assert len(list(read_ticks(p))) == 10
        with open(p, "rb") as f:
            topics = Counter(ch.topic for _, ch, _ in make_reader(f).iter_messages())
        assert all(topics[t] == 10 for t in TICK_TOPICS) and topics[TOPIC_EVENT] == sum(info.meta.events.values())
    # A restarted recorder publishes the leftover if it was complete (killed between finishing and
    # renaming it), otherwise quarantines it; either way open/ is clean and closed/ stays valid.
    restarted = Recorder(killed_spool, "victim", "highway", 0, "1")
    assert (len(restarted.recovered), len(restarted.quarantined)) == (complete, 1 - complete)
    assert list(killed_spool.open_dir.iterdir()) == []
    assert len(killed_spool.closed_segments()) == len(closed) + complete
    for q in restarted.quarantined:
        with pytest.raises(SegmentError):
            validate_segment(q)
    for r in restarted.recovered:
        assert validate_segment(r).meta.n_ticks == 5


@pytest.mark.slow
def test_ray_read_mcap_over_segments(killed_spool: Spool, tmp_path: Path) -> None:
    """ray.data.read_mcap decodes our JSON messages into a struct column; bad files are skipped first."""
    import ray

    data_dir = tmp_path / "segments"
    data_dir.mkdir()
    for p in killed_spool.closed_dir.iterdir():
        (data_dir / p.name).write_bytes(p.read_bytes())
    whole = next(iter(killed_spool.closed_dir.iterdir())).read_bytes()
    (data_dir / "torn.mcap").write_bytes(whole[: len(whole) * 2 // 3])  # as a torn upload would be
    report = scan_directory(data_dir)
    assert [p.name for p, _ in report.rejected] == ["torn.mcap"]
    started = not ray.is_initialized()  # an earlier test in this process may share its runtime
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = ray.data.read_mcap([str(i.path) for i in report.valid], include_paths=True).take_all()
    finally:
        if started:
            ray.shutdown()
    assert len(rows) == sum(i.n_messages for i in report.valid)
    kin = {(Path(r["path"]).name, r["data"]["tick"]): r["data"]["kinematics"]
           for r in rows if r["topic"] == "/sensors/kinematics"}
    grids = {(Path(r["path"]).name, r["data"]["tick"]): decode_grid(r["data"])
             for r in rows if r["topic"] == "/sensors/grid"}
    first = report.valid[0]
    for t in read_ticks(first.path):
        assert np.array_equal(np.asarray(kin[(first.path.name, t.tick)], dtype=np.float32), t.kinematics)
        assert np.array_equal(grids[(first.path.name, t.tick)], t.grid)
    events = [r["data"] for r in rows if r["topic"] == TOPIC_EVENT]
    assert len(events) == sum(sum(i.meta.events.values()) for i in report.valid) > 0
    assert {e["trigger"] for e in events} >= {"hard_brake"}
    applied = [r["data"] for r in rows if r["topic"] == "/control/applied"]
    assert {a["source"] for a in applied} == {"model"} and any(a["aeb"] for a in applied)


def test_rollover_with_an_accumulated_float_clock(tmp_path: Path) -> None:
    """A sim clock built by repeated ``t += 0.2`` drifts low (sum of 100 steps = 19.99999999999996);
    the 20 s rollover must still happen at the 20 s tick, not one tick late."""
    rng = np.random.default_rng(0)
    base = make_tick(0, rng)
    t_s, drifted = 0.0, False
    with Recorder(Spool(tmp_path, 10**9), "car", "highway", 0, "1", triggers=[], verify=False) as rec:
        for i in range(201):
            rec.record(TickRecord(**{**base.__dict__, "t_s": t_s, "tick": i}))
            drifted |= t_s != round(t_s, 6)
            t_s += 0.2
    assert drifted
    assert [validate_segment(p).meta.n_ticks for p in rec.closed] == [100, 100, 1]
