"""Flower's processes, started as children: a deployment (a real SuperLink, the aggregation server, and one
SuperNode per vehicle) and the local simulation (a SuperLink in simulation mode and the SuperExec that
starts each run's ``flwr-simulation`` process). Both run the same ServerApp/ClientApp
(``federated/flower_app.py``), submitted with ``flwr run``.

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
- The simulation's SuperLink runs ``--isolation process``: its SuperExec is started here, in a session of
  its own, so the ``flwr-simulation`` process it launches, and that process's Ray runtime (Ray's processes
  share their starter's group and fate), are stopped with it. That Ray runtime is private, held to the
  run's CPUs, and never joins a Ray cluster left on the box (``RAY_ADDRESS=local``).
- Every process writes to its own log file (``<log_dir>/<name>.log``), never to the terminal; a process
  that dies early is reported with the tail of its log. A simulation process's output goes to its
  SuperLink, not to a file: ``flwr log --stream`` copies it into ``<log_dir>/simulation.log``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.core.exceptions import FederatedError
from driveloop.core.ids import check_vehicle_id
from driveloop.core.procs import die_with_parent_hook

logger = logging.getLogger(__name__)

CONNECTION = "driveloop"
HOST = "127.0.0.1"


def _exe(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FederatedError(f"{name} not found: is flwr installed in this environment?")
    return path


# The folder that holds the driveloop package: Flower's processes load our apps from it, also when driveloop
# runs from a checkout rather than an installed wheel.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _env(flwr_home: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def log_tail(path: Path, chars: int = 1500) -> str:
    """The end of a process's log file, for an error message ("" when it has none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - chars))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


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

    def died(self) -> FederatedError | None:
        """The error to raise when this process has exited (None while it runs)."""
        if self.proc.poll() is None:
            return None
        return FederatedError(f"{self.name} exited with {self.proc.returncode} (log {self.log_path}): "
                              f"{log_tail(self.log_path)[-600:]}")

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM to its process group, SIGKILL after ``grace_s``; then the same to what is left of the group
        (a member can outlive the leader: Ray's agents outlive a killed raylet)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(grace_s)
            except ProcessLookupError:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            end = time.monotonic() + grace_s
            while group_commands(self.proc.pid):
                if time.monotonic() > end:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                time.sleep(0.1)
            else:
                break
        return self.proc.returncode


def _spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str], die_with_parent: bool = False) -> Managed:
    """Start ``argv`` in a session of its own, its output in ``<log_dir>/<name>.log``. ``die_with_parent``:
    the kernel stops it when this process dies, even by ``kill -9`` (Linux; ``core.procs.die_with_parent``)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    preexec = die_with_parent_hook() if die_with_parent else None
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=preexec)
    finally:
        log.close()
    logger.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
    return Managed(name, proc, log_path)


def superlink_argv(port: int, database: Path | None = None, simulation: bool = False) -> list[str]:
    argv = [_exe("flower-superlink"), "--insecure", "--host", HOST, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if database is not None:
        argv += ["--database", str(database)]
    if simulation:  # its runs are simulated; their process is started by our SuperExec (start_simulation)
        argv += ["--simulation", "--isolation", "process"]
    return argv


def superexec_argv(superlink_port: int, parent_pid: int) -> list[str]:
    """The SuperExec that starts the SuperLink's run processes; it exits when ``parent_pid`` does."""
    return [_exe("flower-superexec"), "--insecure", "--runtime-api-address", f"{HOST}:{superlink_port}",
            "--parent-pid", str(parent_pid)]


def supernode_argv(vehicle_id: str, superlink_port: int, port: int) -> list[str]:
    check_vehicle_id(vehicle_id)  # the rule has no quote, space or "=": the node config stays one pair
    return [_exe("flower-supernode"), "--insecure", "--superlink", f"{HOST}:{superlink_port}",
            "--node-config", f'vehicle-id="{vehicle_id}"', "--host", HOST, "--port", str(port)]


def start_superlink(port: int, log_dir: Path, database: Path | None = None, timeout_s: float = 60.0,
                    simulation: bool = False, env: dict[str, str] | None = None) -> Managed:
    m = _spawn("superlink", superlink_argv(port, database, simulation), log_dir, env if env is not None else _env(),
               die_with_parent=simulation)
    try:
        wait_port(port, timeout_s, m.proc)
    except FederatedError as e:
        m.stop()
        raise FederatedError(f"{m.name}: {e} (log {m.log_path}): {log_tail(m.log_path)[-600:]}") from e
    return m


def start_supernode(vehicle_id: str, superlink_port: int, port: int, log_dir: Path, timeout_s: float = 60.0) -> Managed:
    m = _spawn(f"supernode-{vehicle_id}", supernode_argv(vehicle_id, superlink_port, port), log_dir, _env())
    try:
        wait_port(port, timeout_s, m.proc)
    except FederatedError as e:
        m.stop()
        raise FederatedError(f"{m.name}: {e} (log {m.log_path}): {log_tail(m.log_path)[-600:]}") from e
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


def flwr_home_of(run_dir: Path) -> Path:
    """The run's private FLWR_HOME: the CLI's connection config, the installed app of a simulation."""
    return run_dir / "flwr_home"


def log_dir_of(run_dir: Path) -> Path:
    """Where a simulated run's Flower processes write their logs."""
    return run_dir / "logs"


def write_connection(flwr_home: Path, superlink_port: int) -> Path:
    """A private Flower CLI config naming our SuperLink (insecure, 127.0.0.1)."""
    import tomli_w

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION,
                                                 CONNECTION: {"address": f"{HOST}:{superlink_port}", "insecure": True}}}))
    return path


def _toml_value(value: Any) -> str:
    """A ``--federation-config`` value, written as TOML (how ``flwr run`` parses it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def submit(run_dir: Path, superlink_port: int, run_config: dict[str, Any], initial: dict[str, np.ndarray],
           timeout_s: float = 120.0, federation_config: Mapping[str, Any] | None = None) -> str:
    """Write the start weights and the app, then ``flwr run`` it on the SuperLink; returns the run id.
    ``federation_config``: the simulation's settings (``num-supernodes``, the Ray backend's), for a
    SuperLink in simulation mode."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "initial.npz.part"
    with open(tmp, "wb") as f:
        np.savez(f, **initial)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / "initial.npz")
    app_dir = write_flower_app(run_dir / "flower_app", run_config)
    flwr_home = flwr_home_of(run_dir)
    write_connection(flwr_home, superlink_port)
    try:
        argv = [_exe("flwr"), "run", str(app_dir), CONNECTION, "--format", "json"]
        for key, value in (federation_config or {}).items():
            argv += ["--federation-config", f"{key}={_toml_value(value)}"]
        out = subprocess.run(argv, capture_output=True, text=True, env=_env(flwr_home), timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise FederatedError(f"flwr run did not answer within {timeout_s:g} s") from e
    try:
        reply = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError as e:
        raise FederatedError(f"flwr run failed: {(out.stderr or out.stdout).strip()[-300:]}") from e
    if not reply.get("success"):
        raise FederatedError(f"flwr run refused the app: {reply}")
    return str(reply["run-id"])


def wait_finished(run_dir: Path, timeout_s: float, poll_s: float = 1.0, on_round: Callable[[dict[str, Any]], None] | None = None,
                  after_round: int | None = None, check: Callable[[], FederatedError | None] | None = None,
                  rounds: int = 0) -> dict[str, Any]:
    """Block until the ServerApp wrote its final checkpoint, at round ``rounds`` or later (a finished
    run resumed for more rounds says "finished" until its ServerApp resumes); returns the run state.

    Each round record completed after ``after_round`` (default: the checkpoint's when called) goes to
    ``on_round`` as it lands, in round order. ``check`` says why the run can no longer finish (a process it
    needs died); its error is raised unless the final checkpoint landed meanwhile."""
    from driveloop.federated.server import load_checkpoint

    if after_round is None:
        start = load_checkpoint(run_dir)
        after_round = 0 if start is None else int(start.state["completed_round"])
    reported = after_round
    end = time.monotonic() + timeout_s
    while True:
        broken = check() if check is not None else None  # before the read: a run that ended well has its checkpoint
        done = load_checkpoint(run_dir)
        if done is not None:
            for record in done.state["rounds"]:
                if record["round"] > reported:
                    reported = record["round"]
                    if on_round is not None:
                        on_round(record)
            if done.state.get("finished") and done.state["completed_round"] >= rounds:
                return done.state
        if broken is not None:
            got = 0 if done is None else done.state["completed_round"]
            raise FederatedError(f"the federated run in {run_dir} stopped after round {got}: {broken}")
        if time.monotonic() > end:
            raise FederatedError(f"the federated run in {run_dir} did not finish within {timeout_s:g} s")
        time.sleep(poll_s)


def group_commands(pgid: int) -> dict[int, str]:
    """{pid: command line} of the live processes in process group ``pgid`` (Linux /proc)."""
    out: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[2]) != pgid or stat[stat.rindex(")") + 2] == "Z":
                continue
            out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return out


@dataclass
class LocalSimulation:
    """A SuperLink in simulation mode and its SuperExec (``start_simulation``); once a run is submitted,
    the ``flwr log --stream`` that copies the run's output into ``simulation.log`` (``follow``)."""

    run_dir: Path
    port: int
    superlink: Managed
    superexec: Managed
    start_timeout_s: float = 60.0  # for the submitted run's simulation process to appear
    run_log: Managed | None = None
    simulation_seen: bool = False
    followed_at_s: float = 0.0

    def follow(self, run_id: str) -> None:
        self.followed_at_s = time.monotonic()
        self.run_log = _spawn("simulation", [_exe("flwr"), "log", run_id, CONNECTION, "--stream"], log_dir_of(self.run_dir),
                              _env(flwr_home_of(self.run_dir)), die_with_parent=True)

    def simulation_pids(self) -> list[int]:
        """The live ``flwr-simulation`` processes: the SuperExec starts them in its own process group."""
        return sorted(pid for pid, cmd in group_commands(self.superexec.proc.pid).items() if "flwr-simulation" in cmd)

    def check(self) -> FederatedError | None:
        """Why a submitted run can no longer finish: a Flower process died, or the run's simulation
        process ended (it ends only after the ServerApp's final checkpoint when all goes well)."""
        for m in (self.superlink, self.superexec):
            if (err := m.died()) is not None:
                return err
        if self.simulation_pids():
            self.simulation_seen = True
        elif not self.simulation_seen and self.followed_at_s and time.monotonic() - self.followed_at_s > self.start_timeout_s:
            return FederatedError(f"no simulation process started within {self.start_timeout_s:g} s "
                                  f"(log {self.superexec.log_path}): {log_tail(self.superexec.log_path)[-600:]}")
        elif self.simulation_seen:
            log_path = self.superexec.log_path
            if self.run_log is not None:  # the copy of the run's output ends with the run: let it
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.run_log.proc.wait(10.0)
                log_path = self.run_log.log_path
            return FederatedError(f"the simulation process exited (log {log_path}): {log_tail(log_path)[-600:]}")
        return None

    def wait_simulation_exit(self, timeout_s: float) -> bool:
        """Let a finished run's simulation process shut its Ray runtime down and exit by itself."""
        end = time.monotonic() + timeout_s
        while self.simulation_pids():
            if time.monotonic() > end:
                return False
            time.sleep(0.1)
        return True

    def stop(self, grace_s: float = 10.0) -> None:
        """SuperExec's group first (it holds the simulation and its Ray runtime), then the SuperLink's."""
        self.superexec.stop(grace_s)
        if self.run_log is not None:
            self.run_log.stop(grace_s)
        self.superlink.stop(grace_s)


def start_simulation(run_dir: Path, timeout_s: float = 60.0) -> LocalSimulation:
    """A SuperLink in simulation mode on a free loopback port, and the SuperExec that starts its runs'
    simulation processes, logging into ``log_dir_of(run_dir)``; both die with this process. Stop it with
    ``LocalSimulation.stop``."""
    from driveloop.cloud.broker import free_port

    # the simulation's Ray starts a runtime of its own, always
    env = _env(flwr_home_of(run_dir), RAY_ADDRESS="local")
    port = free_port()
    link = start_superlink(port, log_dir_of(run_dir), timeout_s=timeout_s, simulation=True, env=env)
    try:
        execu = _spawn("superexec", superexec_argv(port, link.proc.pid), log_dir_of(run_dir), env, die_with_parent=True)
    except BaseException:
        link.stop()
        raise
    return LocalSimulation(run_dir, port, link, execu, start_timeout_s=timeout_s)
