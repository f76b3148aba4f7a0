"""`driveloop drive --scenario jam-tail --vehicles 8 --hazards on|off` end to end: a real nats-server and hazard
service started and stopped by the command, the same seeds both ways, and `driveloop hazards list`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from driveloop.cli import main

DURATION_S = "180"  # vehicle 7 starts 7 x 400 m further back: it reaches the jam and stands within this


def _servers_for(home: Path) -> list[int]:
    """Pids of nats-server processes whose config lies under ``home`` (there must be none after a command)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"nats-server") and any(str(home).encode() in part for part in cmd):
            pids.append(int(proc.name))
    return pids


def _drive(home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, hazards: str,
           scenario: str = "jam-tail") -> dict:
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    monkeypatch.delenv("DRIVELOOP_NATS_URL", raising=False)
    code = main(["drive", "--scenario", scenario, "--vehicles", "8", "--duration", DURATION_S, "--seed", "0",
                 "--sim-deadline", "--hazards", hazards, "--no-record", "--no-upload", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return json.loads(out)


@pytest.fixture()
def homes(trained_home: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two fresh homes with the same trained model: nothing (no stream, no hazard) carries over between them."""
    out = []
    for name in ("off", "on"):
        dst = tmp_path / name
        dst.mkdir()
        shutil.copytree(trained_home / "registry", dst / "registry")
        out.append(dst)
    return out[0], out[1]


def test_hazards_spare_the_vehicles_behind_the_first(homes, capsys, monkeypatch) -> None:
    off_home, on_home = homes
    off = _drive(off_home, capsys, monkeypatch, "off")
    on = _drive(on_home, capsys, monkeypatch, "on")
    with capsys.disabled():  # the numbers docs/BENCHMARKS.md reports, visible with -s
        print("\njam-tail off:", {k: off[k] for k in ("aeb_activations", "aeb_activations_at_speed",
                                                      "peak_decel_mps2", "collisions")})
        print("jam-tail on:", {k: on[k] for k in ("aeb_activations", "aeb_activations_at_speed", "peak_decel_mps2",
                                                 "collisions", "hazards_received", "hazard_latency_ms_p99")})
    assert off["hazards"] == "off" and off["hazards_received"] == 0 and off["hazard_latency_ms_p99"] is None
    # without hazards every vehicle meets the jam unwarned and the AEB brakes for it at speed
    assert off["aeb_activations_at_speed"] >= 8
    # told, the ones behind slow down in time: AEB at least halved, gentler peak braking, no collision
    assert on["collisions"] == 0
    assert on["aeb_activations"] * 2 <= off["aeb_activations"]
    assert on["aeb_activations_at_speed"] * 2 <= off["aeb_activations_at_speed"]
    assert on["peak_decel_mps2"] < off["peak_decel_mps2"]
    assert on["hazards_received"] >= 7 and on["hazard_latency_samples"] >= 1
    assert on["hazard_latency_ms_p99"] is not None and on["hazard_latency_ms_p99"] > 0
    assert set(on["hazards_dropped"]) <= {"replayed"}  # the copies on other cells and repetitions, nothing else
    assert on["stream_errors"] == {} and on["hazard_service"]["events"] >= 1
    assert on["hazard_service"].get("bad_messages", 0) == 0
    assert _servers_for(on_home) == []  # the command stopped the broker it started

    monkeypatch.setenv("DRIVELOOP_HOME", str(on_home))
    assert main(["hazards", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr()[0])
    assert listed["count"] >= 1
    assert listed["hazards"][0]["cause"] == 27 and listed["hazards"][0]["road"] == "hw1"
    assert main(["hazards", "list"]) == 0
    assert f"active hazards ({listed['count']})" in capsys.readouterr()[0]


def test_a_bad_hazards_value_is_one_line(random_home, capsys, monkeypatch) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(random_home))
    assert main(["drive", "--scenario", "jam-tail", "--hazards", "maybe", "--no-record", "--json"]) == 2
    err = capsys.readouterr()[1]
    assert err.strip() == "driveloop: error: --hazards must be on or off, got 'maybe'"
