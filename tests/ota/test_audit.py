"""Audit log: the hash chain detects every kind of tampering and names the first bad entry."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from driveloop.core.exceptions import StorageError
from driveloop.ota.audit import GENESIS, AuditEntry, JsonlAuditLog, make_entry, verify


def chain(n: int) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    for i in range(n):
        out.append(make_entry(out[-1] if out else None, float(i), "decision", "controller", 1,
                              {"action": "hold", "i": i}))
    return out


def test_chain_links() -> None:
    c = chain(5)
    assert c[0].prev_hash == GENESIS and all(b.prev_hash == a.hash for a, b in zip(c, c[1:], strict=False))
    assert verify(c).ok and verify(c).entries == 5
    assert verify([]).ok


TAMPERS = [
    ("payload edited", lambda c: c[:2] + [replace(c[2], payload={"action": "promote", "i": 2})] + c[3:], 2),
    ("actor edited", lambda c: c[:3] + [replace(c[3], actor="mallory")] + c[4:], 3),
    ("entry removed", lambda c: c[:1] + c[2:], 1),
    ("entries swapped", lambda c: [c[0], c[2], c[1]] + c[3:], 1),
    ("rehashed but not relinked", lambda c: c[:1] + [make_entry(None, 1.0, "decision", "x", 1, {})] + c[2:], 1),
    ("hash field forged", lambda c: c[:4] + [replace(c[4], hash="f" * 64)], 4),
]


@pytest.mark.parametrize("name,tamper,first_bad", TAMPERS, ids=[t[0] for t in TAMPERS])
def test_tampering_detected(name: str, tamper, first_bad: int) -> None:  # type: ignore[no-untyped-def]
    r = verify(tamper(chain(5)))
    assert not r.ok
    assert r.first_bad == first_bad
    assert r.reason


def test_jsonl_log_appends_reopens_and_detects_file_edit(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(p)
    for i in range(4):
        log.append(float(i), "operator", "alice", 7, {"kind": "pause", "i": i})
    again = JsonlAuditLog(p)
    e = again.append(9.0, "decision", "controller", 7, {"action": "abort"})
    assert e.seq == 4 and again.verify().ok
    lines = p.read_text().splitlines()
    d = json.loads(lines[1])
    d["payload"]["kind"] = "resume"
    lines[1] = json.dumps(d)
    p.write_text("\n".join(lines) + "\n")
    r = JsonlAuditLog(p).verify()
    assert not r.ok and r.first_bad == 1


def test_torn_line_is_reported(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    JsonlAuditLog(p).append(0.0, "start", "op", 1, {})
    with p.open("ab") as f:
        f.write(b'{"seq": 1, "at_s"')
    with pytest.raises(StorageError, match="torn"):
        JsonlAuditLog(p)


def test_store_audit_chain_detects_a_database_edit(tmp_path: Path) -> None:
    """The fleet store keeps the same chain in SQLite: editing a row behind its back is detected."""
    from sqlalchemy import text

    from driveloop.ota.controller import OperatorAction, RolloutEvent, RolloutPlan, apply
    from driveloop.ota.store import FleetStore

    store = FleetStore.at(tmp_path / "ota")
    plan = RolloutPlan.default()
    rid = store.create_rollout("v2", "v1", plan, 10.0, "alice")
    state = store.load(rid).state
    for i, kind in enumerate(["pause", "resume", "abort"], 1):
        state = apply(state, plan, OperatorAction(kind, 10.0 + i, "alice", f"step {i}"))
        store.append_event(rid, RolloutEvent("operator", 10.0 + i, {"kind": kind, "actor": "alice",
                                                                     "reason": f"step {i}"}),
                           "operator", "alice", {"action": kind, "reason": f"step {i}"})
    assert store.verify_audit().ok and store.verify_audit().entries == 4
    assert store.load(rid).state == state  # replayed from the event log
    with store.engine.begin() as c:
        c.execute(text("UPDATE audit SET payload = :p WHERE seq = 2"),
                  {"p": json.dumps({"action": "promote", "reason": "step 2"})})
    r = store.verify_audit()
    assert not r.ok and r.first_bad == 2 and "modified" in r.reason
