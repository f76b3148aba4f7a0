"""Deployment: a real SuperLink (aggregation server) and one SuperNode per vehicle, running the same
ServerApp/ClientApp as the simulation (``federated/flower_app.py``), started as child processes.

Rules it keeps:
- Everything binds to 127.0.0.1 and runs ``--insecure`` (no TLS): this is the embedded/demo setup; a
  real fleet puts TLS and SuperNode auth in front (Flower's ``--ssl-*`` and ``--enable-supernode-auth``).
- Flower 1.42 serves the Runtime, Control and Fleet APIs of a SuperLink on one HTTP port; each SuperNode
  needs its own port for its ClientApp runtime API.
- The Flower CLI's connection config lives in a private ``FLWR_HOME`` under the run directory (never the
  user's ``~/.flwr``); runtime dependency installation is off (no network: the apps are already installed).
- A run is submitted with ``flwr run <app dir> <connection>``; the app directory is generated here with
  the run's settings as its ``[tool.flwr.app.config]`` and the start weights in ``<run_dir>/initial.npz``.
- Processes are stopped by their own process group (each starts a session of its own): SIGTERM, then
  SIGKILL after a grace period, so ClientApp subprocesses never outlive the node.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.core.exceptions import FederatedError
from driveloop.core.ids import check_vehicle_id

logger = logging.getLogger(__name__)

CONNECTION = "driveloop"
HOST = "127.0.0.1"


def _exe(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FederatedError(f"{name} not found: is flwr installed in this environment?")
    return path


def _env(flwr_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something listens on 127.0.0.1:``port`` (FederatedError if the process died first)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise FederatedError(f"process exited with {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise FederatedError(f"nothing listens on {HOST}:{port} after {timeout_s:g} s")


@dataclass
class Managed:
    """A child process in its own session, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, grace_s: float = 5.0) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(grace_s)
            except ProcessLookupError:
                pass
        return self.proc.returncode


def _spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> Managed:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        log.close()
    logger.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
    return Managed(name, proc, log_path)


def superlink_argv(port: int, database: Path | None = None) -> list[str]:
    argv = [_exe("flower-superlink"), "--insecure", "--host", HOST, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if database is not None:
        argv += ["--database", str(database)]
    return argv


def supernode_argv(vehicle_id: str, superlink_port: int, port: int) -> list[str]:
    check_vehicle_id(vehicle_id)  # the rule has no quote, space or "=": the node config stays one pair
    return [_exe("flower-supernode"), "--insecure", "--superlink", f"{HOST}:{superlink_port}",
            "--node-config", f'vehicle-id="{vehicle_id}"', "--host", HOST, "--port", str(port)]


def start_superlink(port: int, log_dir: Path, database: Path | None = None, timeout_s: float = 60.0) -> Managed:
    m = _spawn("superlink", superlink_argv(port, database), log_dir, _env())
    try:
        wait_port(port, timeout_s, m.proc)
    except FederatedError:
        m.stop()
        raise
    return m


def start_supernode(vehicle_id: str, superlink_port: int, port: int, log_dir: Path, timeout_s: float = 60.0) -> Managed:
    m = _spawn(f"supernode-{vehicle_id}", supernode_argv(vehicle_id, superlink_port, port), log_dir, _env())
    try:
        wait_port(port, timeout_s, m.proc)
    except FederatedError:
        m.stop()
        raise
    return m


def write_flower_app(app_dir: Path, run_config: dict[str, Any]) -> Path:
    """The Flower app project ``flwr run`` builds: our components plus this run's settings."""
    import tomli_w

    app_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "driveloopfl", "version": "1.0.0", "dependencies": []},
        "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
                 "flwr": {"app": {"publisher": "driveloop",
                                  "components": {"serverapp": "driveloop.federated.flower_app:server_app",
                                                 "clientapp": "driveloop.federated.flower_app:client_app"},
                                  "config": run_config}}},
    }
    path = app_dir / "pyproject.toml"
    tmp = path.with_suffix(".toml.part")
    tmp.write_text(tomli_w.dumps(doc))
    os.replace(tmp, path)
    return app_dir


def write_connection(flwr_home: Path, superlink_port: int) -> Path:
    """A private Flower CLI config naming our SuperLink (insecure, 127.0.0.1)."""
    import tomli_w

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION,
                                                 CONNECTION: {"address": f"{HOST}:{superlink_port}", "insecure": True}}}))
    return path


def submit(run_dir: Path, superlink_port: int, run_config: dict[str, Any], initial: dict[str, np.ndarray],
           timeout_s: float = 120.0) -> str:
    """Write the start weights and the app, then ``flwr run`` it on the SuperLink; returns the run id."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "initial.npz.part"
    with open(tmp, "wb") as f:
        np.savez(f, **initial)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / "initial.npz")
    app_dir = write_flower_app(run_dir / "flower_app", run_config)
    flwr_home = run_dir / "flwr_home"
    write_connection(flwr_home, superlink_port)
    try:
        out = subprocess.run([_exe("flwr"), "run", str(app_dir), CONNECTION, "--format", "json"], capture_output=True,
                             text=True, env=_env(flwr_home), timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise FederatedError(f"flwr run did not answer within {timeout_s:g} s") from e
    try:
        reply = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError as e:
        raise FederatedError(f"flwr run failed: {(out.stderr or out.stdout).strip()[-300:]}") from e
    if not reply.get("success"):
        raise FederatedError(f"flwr run refused the app: {reply}")
    return str(reply["run-id"])


def wait_finished(run_dir: Path, timeout_s: float, poll_s: float = 1.0) -> dict[str, Any]:
    """Block until the ServerApp wrote its final checkpoint; returns the run state."""
    from driveloop.federated.server import load_checkpoint

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        done = load_checkpoint(run_dir)
        if done is not None and done.state.get("finished"):
            return done.state
        time.sleep(poll_s)
    raise FederatedError(f"the federated run in {run_dir} did not finish within {timeout_s:g} s")
