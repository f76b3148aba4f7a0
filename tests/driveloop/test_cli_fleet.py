"""``driveloop fleet run``: the fleet's JSON (summary, cost, shards, execution) and one-line errors.
On Ray the same command is run by tests/cloud/test_sim_exec.py's shard tests (``drive_shards``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driveloop.cli import main


def test_fallback_fleet_in_process_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["fleet", "run", "-n", "6", "-d", "3", "--fallback-only", "--scenario", "mix", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["vehicles"] == 6 and r["driven_s"] == pytest.approx(6 * 3.0) and r["model"] is None
    assert r["execution"] == {"backend": "local", "nodes": 1, "workers": 1, "units": 1, "node_ids": ["local"]}
    assert [s["vehicles"] for s in r["shards"]] == [6] and r["shards"][0]["node"] == "local"
    assert r["vehicle_s_per_cpu_s"] > 0 and r["memory_per_vehicle_bytes"] >= 0
    assert not list(tmp_path.rglob("*.mcap"))  # a load run records nothing


def test_model_fleet_reports_its_model(random_home: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(random_home))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["fleet", "run", "-n", "3", "-d", "2", "--backend", "local", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == 1 and r["vehicles"] == 3 and r["execution"]["backend"] == "local"


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "dask"], "--backend must be one of auto, ray, local"),
    (["--scenario", "nope"], "nope"),
    (["--fallback-only", "--model", "1"], "--model cannot go with --fallback-only"),
    (["--vehicles", "0"], "--vehicles"),
])
def test_bad_input_is_one_line(args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path))
    assert main(["fleet", "run", "--json", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("driveloop: error:") and message in err
