"""IsolatedRuntime: the model in its own process, so the vehicle outlives it.

Why: a model that segfaults, leaks, hangs in a kernel or returns garbage must never take the control
loop with it. The loop talks to the model process without ever blocking past its deadline:

- ``submit(batch, now_s)`` copies the batch into a shared memory-mapped buffer and sends a tiny
  request over a pipe (a pipe write of the whole batch could block on a hung reader; this cannot).
- ``poll(deadline_s)`` waits at most until the deadline for that request's reply; ``None`` is a miss,
  and so is a reply read after the deadline. A request the model failed (any exception in the child:
  the child answers with the error and keeps serving) raises ModelError.
- At most one request is in flight; while the child is busy (late or hung) ``submit`` returns False.
- A dead child (SIGKILL, crash) is seen as EOF on the pipe or by its exit code; a child silent for
  ``hang_timeout_s`` is killed. Either way it is restarted after an exponential backoff, from the
  loop's own calls (``Process.start`` only forks/execs; the model loads in the child, off the loop).

Faults (``inject``) for tests and ``driveloop drive --fault``: the model-side rows of
:data:`~driveloop.edge.faults.FAULTS` — kill (SIGKILL the child), hang (the child sleeps forever on the
next request), nan, garbage, late (reply after ``late_delay_s``), error (the run raises).
``edge.faults.FaultyRunner`` applies the same faults to any in-process ModelRunner. Detecting them is the
safety watchdog's job; this module only reports what happened.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from driveloop.contracts import observation as C
from driveloop.edge.faults import Fault, lookup
from driveloop.edge.runtime import BATCH_BUCKETS, validate_batch
from driveloop.core.exceptions import ConfigError, IntegrityError, ModelError

if TYPE_CHECKING:
    from driveloop.contracts.manifest import ModelManifest

logger = logging.getLogger(__name__)

_ROW_FLOATS = sum(int(np.prod(s.shape)) for s in C.INPUTS)


@dataclass(frozen=True)
class IsolationConfig:
    """Timing of the model process supervision (seconds)."""

    restart_backoff_min_s: float = 0.2
    restart_backoff_max_s: float = 5.0
    hang_timeout_s: float = 1.0  # a request unanswered this long means the child is hung: kill it
    start_timeout_s: float = 60.0  # a child that has not loaded its model by then is killed
    late_delay_s: float = 0.3  # how late the "late" fault replies: 3 control periods
    max_batch: int = BATCH_BUCKETS[-1]

    def __post_init__(self) -> None:
        if not 0 < self.restart_backoff_min_s <= self.restart_backoff_max_s:
            raise ConfigError("need 0 < restart_backoff_min_s <= restart_backoff_max_s")
        if min(self.hang_timeout_s, self.start_timeout_s, self.late_delay_s) <= 0 or self.max_batch < 1:
            raise ConfigError("hang_timeout_s, start_timeout_s, late_delay_s and max_batch must be > 0")


@dataclass(frozen=True)
class Reply:
    """One inference reply as the model process sent it (not yet judged by the watchdog)."""

    request_id: int
    action: np.ndarray
    confidence: np.ndarray
    latency_s: float  # submit -> reply received

    def well_formed(self, n: int) -> bool:
        """Right shapes and finite values (the watchdog does the full range checks)."""
        return (self.action.shape == (n, 2) and self.confidence.shape == (n, 1)
                and bool(np.isfinite(self.action).all() and np.isfinite(self.confidence).all()))


def _unlink(path: str) -> None:
    Path(path).unlink(missing_ok=True)


def _buffer_views(buf: np.ndarray, max_batch: int) -> dict[str, np.ndarray]:
    """Contract-shaped views into one flat float32 buffer: [kinematics | lidar | grid], max_batch rows each."""
    views, offset = {}, 0
    for spec in C.INPUTS:
        size = max_batch * int(np.prod(spec.shape))
        views[spec.name] = buf[offset:offset + size].reshape(max_batch, *spec.shape)
        offset += size
    return views


def _child_main(fd: int) -> None:
    """The model process: load + verify the model, then serve requests until told to stop or orphaned."""
    from multiprocessing.connection import Connection

    from driveloop.contracts.manifest import parse_manifest
    from driveloop.edge.runtime import ModelRuntime
    from driveloop.core.exceptions import DriveloopError

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(fd)
    parent_pid = os.getppid()
    buf_path, max_batch, onnx_path, manifest_json, device, threads = conn.recv()
    try:
        rt = ModelRuntime(onnx_path, parse_manifest(manifest_json), device=device, intra_op_threads=threads)
        rt.warmup()
    except DriveloopError as e:
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    views = _buffer_views(np.memmap(buf_path, np.float32, "r", shape=(max_batch * _ROW_FLOATS,)), max_batch)
    conn.send(("ready", rt.provider))
    fault: Fault | None = None
    fault_left: int | None = 0
    late_s = 0.0
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the vehicle process died without close(): clean up its buffer
            _unlink(buf_path)
            return
        if msg[0] == "stop":
            return
        if msg[0] == "fault":
            fault, fault_left, late_s = lookup(msg[1], "model"), msg[2], msg[3]
            continue
        _, rid, n = msg
        active = fault if fault_left is None or fault_left > 0 else None
        if active is not None and fault_left is not None:
            fault_left -= 1
        if active is not None and active.hangs:
            while os.getppid() == parent_pid:  # hung for good, but never outlive the vehicle process
                time.sleep(0.5)
            _unlink(buf_path)
            return
        try:
            if active is not None and active.raises is not None:
                raise active.raises()
            action, conf = rt.run({name: views[name][:n] for name in C.INPUT_NAMES})
        except Exception as e:  # noqa: BLE001 - ORT's run errors are untyped (Fail, MemoryError…): answer, serve on
            conn.send(("error", rid, f"{type(e).__name__}: {e}"))
            continue
        if active is not None and active.late:
            time.sleep(late_s)
        if active is not None and active.corrupt is not None:
            action, conf = active.corrupt(action, conf)
        conn.send(("ok", rid, action, conf))


class IsolatedRuntime:
    """A ModelRuntime in a supervised child process (see module docstring)."""

    def __init__(
        self,
        onnx_path: Path | str,
        manifest: ModelManifest,
        *,
        device: str = "cpu",
        intra_op_threads: int = 1,
        config: IsolationConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from driveloop.contracts.manifest import sha256_file

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}")
        if sha256_file(self.path) != manifest.sha256:  # fail fast here; the child checks again, fully
            raise IntegrityError(f"{self.path.name}: sha256 does not match manifest v{manifest.version}")
        self.config = cfg = config or IsolationConfig()
        self._manifest, self._device, self._threads, self._clock = manifest, device, intra_op_threads, clock
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # RAM-backed where available
        fd, name = tempfile.mkstemp(prefix="driveloop-batch-", suffix=".f32", dir=shm_dir)
        os.close(fd)
        self._buf_path = name
        self._buf = np.memmap(name, np.float32, "w+", shape=(cfg.max_batch * _ROW_FLOATS,))
        self._views = _buffer_views(self._buf, cfg.max_batch)
        # Remove the shared buffer even if close() is never called (the object is dropped, or at exit).
        self._finalizer = weakref.finalize(self, _unlink, name)
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._state = "stopped"  # stopped | starting | ready | waiting | failed
        self._provider = "none"
        self._started_s = 0.0
        self._restart_at_s = 0.0
        self._backoff_s = cfg.restart_backoff_min_s
        self._next_id = 0
        self._in_flight: tuple[int, float] | None = None  # (request id, submitted at)
        self.restarts = 0
        self.error: str | None = None
        self._spawn(clock())

    # -- lifecycle -----------------------------------------------------------------------------------

    def _spawn(self, now_s: float) -> None:
        """Start a fresh interpreter for the model (not a fork: no inherited threads, locks or ORT state).

        A plain ``python -c`` child rather than multiprocessing's spawn, which would re-import the
        parent's ``__main__`` (a script without a main guard would then run twice).
        """
        parent_sock, child_sock = socket.socketpair()
        code = f"from driveloop.edge.isolated import _child_main; _child_main({child_sock.fileno()})"
        proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL)
        child_sock.close()  # so the parent sees EOF when the child dies
        conn = Connection(parent_sock.detach())
        conn.send((self._buf_path, self.config.max_batch, str(self.path), self._manifest.to_json(),
                   self._device, self._threads))
        self._proc, self._conn, self._state, self._started_s, self._in_flight = proc, conn, "starting", now_s, None
        logger.info("model process pid %d starting (v%d)", proc.pid, self._manifest.version)

    def _live(self) -> tuple[subprocess.Popen[bytes], Connection]:
        """The current child and its connection (called only in states that have one)."""
        if self._proc is None or self._conn is None:
            raise ModelError(f"no model process ({self._state})")
        return self._proc, self._conn

    def _on_death(self, now_s: float, why: str) -> None:
        """Reap the child and schedule a restart after the current backoff."""
        code = None
        if self._proc is not None and self._conn is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            code = self._proc.wait(timeout=5.0)
            self._conn.close()
        self._restart_at_s = now_s + self._backoff_s
        logger.warning("model process %s (exit %s); restart in %.2fs", why, code, self._backoff_s)
        self._backoff_s = min(2 * self._backoff_s, self.config.restart_backoff_max_s)
        self._proc, self._conn, self._in_flight, self._state = None, None, None, "waiting"

    def _service(self, now_s: float) -> None:
        """Non-blocking housekeeping run from every call: detect death/hang, restart, read 'ready'."""
        cfg = self.config
        if self._state == "waiting" and now_s >= self._restart_at_s:
            self.restarts += 1
            self._spawn(now_s)
        if self._state not in ("starting", "ready"):
            return
        proc, conn = self._live()
        if proc.poll() is not None:
            self._on_death(now_s, "died")
            return
        if self._state == "starting":
            if conn.poll(0):
                self._read_startup(now_s)
            elif now_s - self._started_s > cfg.start_timeout_s:
                self._on_death(now_s, f"did not load its model in {cfg.start_timeout_s}s")
        elif self._in_flight is not None and now_s - self._in_flight[1] > cfg.hang_timeout_s and not conn.poll(0):
            self._on_death(now_s, f"hung (no reply in {cfg.hang_timeout_s}s)")

    def _read_startup(self, now_s: float) -> None:
        proc, conn = self._live()
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            self._on_death(now_s, "died while loading")
            return
        if msg[0] == "fatal":  # the model itself is unusable: restarting cannot fix it
            self.error = msg[1]
            proc.wait(timeout=5.0)
            conn.close()
            self._proc, self._conn, self._state = None, None, "failed"
            logger.error("model process refused the model: %s", msg[1])
        else:
            self._provider, self._state = msg[1], "ready"

    def _drain(self, now_s: float) -> Reply | None:
        """Read whatever replies are waiting (never blocks); returns the in-flight request's reply if there."""
        while self._conn is not None and self._conn.poll(0):
            try:
                reply = self._receive(now_s)
            except ModelError as e:  # the request we gave up on failed as well: it was already a miss
                logger.debug("late error reply dropped: %s", e)
                continue
            if reply is not None:
                return reply
        return None

    def _receive(self, now_s: float) -> Reply | None:
        try:
            msg = self._live()[1].recv()
        except (EOFError, OSError):
            self._on_death(now_s, "died")
            return None
        if self._in_flight is None or msg[1] != self._in_flight[0]:
            return None  # a reply to a request we already gave up on
        rid, submitted_s = self._in_flight
        self._in_flight = None
        self._backoff_s = self.config.restart_backoff_min_s  # it answered: healthy again
        if msg[0] == "error":
            self.error = msg[2]
            raise ModelError(f"model process failed request {rid}: {msg[2]}")
        return Reply(rid, msg[2], msg[3], now_s - submitted_s)

    # -- control-loop API ----------------------------------------------------------------------------

    def submit(self, batch: dict[str, np.ndarray], now_s: float | None = None) -> bool:
        """Send a batch for inference; False when the model process cannot take it now (dead, busy, loading)."""
        now_s = self._clock() if now_s is None else now_s
        n = validate_batch(batch)
        if n > self.config.max_batch:
            raise ConfigError(f"batch of {n} exceeds max_batch {self.config.max_batch}")
        if self._state == "ready" and self._in_flight is not None:
            self._drain(now_s)  # a late reply to the previous request: stale now, but it frees the child
        self._service(now_s)
        if self._state != "ready" or self._in_flight is not None:
            return False
        for name in C.INPUT_NAMES:
            self._views[name][:n] = batch[name]
        self._next_id += 1
        try:
            self._live()[1].send(("infer", self._next_id, n))
        except (BrokenPipeError, OSError):
            self._on_death(now_s, "died")
            return False
        self._in_flight = (self._next_id, now_s)
        return True

    def poll(self, deadline_s: float) -> Reply | None:
        """Wait (at most until ``deadline_s`` on this runtime's clock) for the in-flight reply; None = missed.

        Past the deadline a reply is late however it got there, so the answer does not depend on when the
        caller came round to polling. ModelError when the model process failed the request.
        """
        while self._in_flight is not None and self._conn is not None:
            remaining = deadline_s - self._clock()
            if remaining < 0 or not self._conn.poll(remaining):
                return None  # a reply still on its way is drained as stale by the next submit
            reply = self._receive(self._clock())
            if reply is not None and self._clock() > deadline_s:
                logger.debug("reply to request %d read after its deadline: a miss", reply.request_id)
                return None
            if reply is not None or self._in_flight is None:
                return reply
        return None

    def run(self, batch: dict[str, np.ndarray], timeout_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Blocking ModelRunner-style call; ModelError when no reply came within ``timeout_s``."""
        now = self._clock()
        if not self.submit(batch, now):
            raise ModelError(f"model process not available ({self._state})")
        reply = self.poll(now + timeout_s)
        if reply is None:
            raise ModelError(f"model process gave no reply within {timeout_s}s")
        return reply.action, reply.confidence

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Block until the model process has loaded its model (startup/tests only, never in the loop)."""
        end = self._clock() + timeout_s
        while self._clock() < end:
            self._service(self._clock())
            if self._state in ("ready", "failed"):
                break
            if self._conn is not None:
                self._conn.poll(0.01)
            else:
                time.sleep(0.01)
        return self._state == "ready"

    def inject(self, kind: str, count: int | None = 1) -> None:
        """Inject a fault: kill now, or hang/nan/garbage/late on the next ``count`` requests (None = all)."""
        fault = lookup(kind, "model")
        if self._proc is None or self._conn is None:
            raise ModelError(f"no model process to inject {kind!r} into ({self._state})")
        pid = self._proc.pid
        try:
            if fault.kills:
                os.kill(pid, signal.SIGKILL)
            else:
                self._conn.send(("fault", kind, count, self.config.late_delay_s))
        except OSError:  # it died on its own first: nothing left to inject into
            self._on_death(self._clock(), "died")
            return
        logger.warning("fault injected into model process pid %d: %s", pid, kind)

    def now(self) -> float:
        """This runtime's clock: the one its deadlines, hang timeout and restart backoff are measured on."""
        return self._clock()

    @property
    def alive(self) -> bool:
        """The model process is up, has loaded its model and is not overdue on a request."""
        self._service(self._clock())
        return self._state == "ready" and self._proc is not None and self._proc.poll() is None

    @property
    def state(self) -> str:
        return self._state

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    @property
    def provider(self) -> str:
        return f"isolated:{self._provider}"

    def close(self) -> None:
        if self._proc is not None and self._conn is not None:
            try:
                self._conn.send(("stop",))
            except OSError:
                pass  # already dead: the kill below is all that is left to do
            try:
                self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:  # hung: it cannot read "stop"
                self._proc.kill()
                self._proc.wait(timeout=5.0)
            self._conn.close()
        self._proc, self._conn, self._state = None, None, "stopped"
        self._finalizer()

    def __enter__(self) -> IsolatedRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

