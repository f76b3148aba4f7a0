"""The stream client's on-disk spool: order, acks, torn tails, the size cap."""

from __future__ import annotations

from pathlib import Path

from driveloop.edge._stream_spool import Spool


def _items(n: int, start: int = 0, size: int = 10) -> list[tuple[str, str, bytes]]:
    return [("tel.v1", f"v1:{i}", bytes([i % 251]) * size) for i in range(start, start + n)]


def test_order_acks_and_reload(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    sp.append(_items(5))
    got = sp.next_unsent(3)
    assert [r.msg_id for r in got] == ["v1:0", "v1:1", "v1:2"]
    sp.ack(got[1].index)  # out of order: the cursor waits for 0
    assert len(sp) == 5
    sp.ack(got[0].index)
    assert len(sp) == 3
    sp.close()
    again = Spool(tmp_path)
    assert [r.msg_id for r in again.next_unsent(10)] == ["v1:2", "v1:3", "v1:4"]  # 0 and 1 acked
    again.rewind()
    assert [r.msg_id for r in again.next_unsent(1)] == ["v1:2"]


def test_torn_tail_is_cut(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    sp.append(_items(3))
    sp.close()
    seg = sorted(tmp_path.glob("*.log"))[-1]
    with open(seg, "ab") as f:
        f.write(b"\x40\x00\x00\x00garbage")  # a record header whose body never made it to disk
    again = Spool(tmp_path)
    assert [r.msg_id for r in again.next_unsent(10)] == ["v1:0", "v1:1", "v1:2"]
    again.append(_items(1, start=3))
    again.close()
    assert [r.msg_id for r in Spool(tmp_path).next_unsent(10)] == ["v1:0", "v1:1", "v1:2", "v1:3"]


def test_size_cap_evicts_oldest_and_counts(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=8 * 1024)
    for start in range(0, 2000, 100):
        sp.append(_items(100, start=start, size=200))
    total = sum(p.stat().st_size for p in tmp_path.glob("*.log"))
    assert total <= 64 * 1024 + 8 * 1024
    assert sp.dropped > 0 and len(sp) + sp.dropped == 2000
    kept = sp.next_unsent(5000)
    assert kept[-1].msg_id == "v1:1999" and [r.index for r in kept] == list(range(kept[0].index, 2000))


def test_fully_acked_segments_are_removed(tmp_path: Path) -> None:
    sp = Spool(tmp_path, segment_bytes=4096)
    sp.append(_items(100, size=100))
    for r in sp.next_unsent(100):
        sp.ack(r.index)
    assert len(sp) == 0 and list(tmp_path.glob("*.log")) == []
    sp.close()
    assert len(Spool(tmp_path)) == 0
