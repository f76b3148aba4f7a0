"""Deployment on 127.0.0.1: `driveloop fl serve` (a real SuperLink) + three `driveloop fl vehicle`
(real SuperNodes), then `driveloop fl start` submits the same ServerApp/ClientApp with `flwr run` and
completes two rounds; the result is gated and registered like a simulated run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from driveloop.cli import main
from driveloop.core.exceptions import ConfigError
from driveloop.federated.deploy import supernode_argv, wait_port, write_flower_app
from tests.federated.conftest import EPISODE_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(args: list[str], home: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, DRIVELOOP_HOME=str(home), FLWR_TELEMETRY_ENABLED="0")
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-c", "from driveloop.cli import main; main()", *args],
                                stdout=f, stderr=subprocess.STDOUT, env=env)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # the CLI stops its Flower process group on Ctrl-C
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_superlink_and_three_supernodes_complete_two_rounds(fl_home: Path, monkeypatch, capsys, tmp_path) -> None:
    link_port = _free_port()
    procs = [_cli(["fl", "serve", "--port", str(link_port)], fl_home, tmp_path / "serve.log")]
    try:
        wait_port(link_port, 60, None)
        for i in range(3):
            procs.append(_cli(["fl", "vehicle", "--id", str(i), "--superlink-port", str(link_port),
                               "--port", str(_free_port())], fl_home, tmp_path / f"vehicle{i}.log"))
        monkeypatch.setenv("DRIVELOOP_HOME", str(fl_home))
        code = main(["fl", "start", "--superlink-port", str(link_port), "--rounds", "2", "--vehicles", "3",
                     "--quorum", "0.6", "--local-epochs", "1", "--episodes", "2", "--episode-s", str(EPISODE_S),
                     "--suite-classes", "ccrs", "--suite-duration", "4", "--timeout", "900", "--json"])
        out = capsys.readouterr().out
        assert code == 0, out
        r = json.loads(out)
        assert r["rounds"] == 2 and r["rounds_aggregated"] == 2
        assert [rec["participants"] for rec in r["round_log"]] == [["fl000", "fl001", "fl002"]] * 2
        assert r["flower_run_id"]
        assert r["candidate_stage"] == ("validated" if r["gate"]["passed"] else "rejected")
    finally:
        for p in reversed(procs):
            _stop(p)
    assert all(p.returncode is not None for p in procs)


def test_supernode_refuses_a_vehicle_id_that_would_break_its_node_config() -> None:
    with pytest.raises(ConfigError):
        supernode_argv('fl0" x="1', 9093, 9200)


def test_flower_app_carries_the_run_config(tmp_path: Path) -> None:
    import tomllib

    write_flower_app(tmp_path, {"server.rounds": 2, "vehicle.home": "/x"})
    doc = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    app = doc["tool"]["flwr"]["app"]
    assert app["components"]["serverapp"] == "driveloop.federated.flower_app:server_app"
    assert app["config"] == {"server.rounds": 2, "vehicle.home": "/x"}
