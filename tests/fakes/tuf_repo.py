"""Fakes and fixtures for OTA tests: a tiny in-memory model registry with real ONNX files, and a
threaded HTTP server on 127.0.0.1 that serves a TUF repository directory and can misbehave on purpose
(cut connections, stream endless data, count every byte it sends).
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import numpy as np
import onnx
from driveloop.contracts.observation import INPUTS, KIN_DIM, OUTPUTS
from onnx import TensorProto, helper, numpy_helper
from pydantic import BaseModel

from driveloop.core.exceptions import RegistryError


class FakeManifest(BaseModel):
    name: str
    version: str
    sha256: str
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    created_at: str


@dataclass
class FakeArtifact:
    onnx_path: Path
    manifest: FakeManifest
    stage: str


def tiny_policy_onnx(seed: int, pad_bytes: int = 0) -> bytes:
    """A real ONNX policy honouring the I/O contract; ``seed`` changes the weights (and the bytes)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(KIN_DIM, 2)).astype(np.float32), "w")
    inits = [w]
    nodes = [
        helper.make_node("MatMul", ["kinematics", "w"], ["action"]),
        helper.make_node("ReduceMean", ["kinematics"], ["m"], keepdims=1, axes=[1]),
        helper.make_node("Sigmoid", ["m"], ["confidence"]),
    ]
    if pad_bytes:  # a bigger file for download tests, still a valid model
        inits.append(numpy_helper.from_array(rng.normal(size=(pad_bytes // 4,)).astype(np.float32), "pad"))
    graph = helper.make_graph(
        nodes,
        "policy",
        [helper.make_tensor_value_info(s.name, TensorProto.FLOAT, ["batch", *s.shape]) for s in INPUTS],
        [helper.make_tensor_value_info(s.name, TensorProto.FLOAT, ["batch", *s.shape]) for s in OUTPUTS],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@dataclass
class FakeRegistry:
    """Registry(root).get / set_stage, backed by real files in ``root``."""

    root: Path
    models: dict[str, FakeArtifact] = field(default_factory=dict)
    stage_log: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, version: str, seed: int, stage: str = "validated", pad_bytes: int = 0) -> FakeArtifact:
        data = tiny_policy_onnx(seed, pad_bytes)
        path = self.root / version / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        onnx.checker.check_model(onnx.load_from_string(data))
        manifest = FakeManifest(
            name="policy",
            version=version,
            sha256=hashlib.sha256(data).hexdigest(),
            inputs={s.name: list(s.shape) for s in INPUTS},
            outputs={s.name: list(s.shape) for s in OUTPUTS},
            created_at=datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
        )
        self.models[version] = FakeArtifact(path, manifest, stage)
        return self.models[version]

    def get(self, version: str) -> FakeArtifact:
        if version not in self.models:
            raise RegistryError(f"unknown model version {version!r}")
        return self.models[version]

    def set_stage(self, version: str, stage: str, reason: str) -> FakeArtifact:
        self.get(version).stage = stage
        self.stage_log.append((version, stage, reason))
        return self.models[version]


@dataclass
class ServerBehaviour:
    """Knobs a test turns to make the server misbehave; counters it reads afterwards."""

    cut_after_bytes: int = 0  # 0: never cut; else close the connection after this many body bytes
    cuts_left: int = 0
    endless_suffix: str | None = None  # targets ending in this are followed by endless junk
    overrides: dict[str, bytes] = field(default_factory=dict)  # url path -> bytes served instead
    bytes_served: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path
    behaviour: ServerBehaviour

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        return

    def do_GET(self) -> None:
        b = self.behaviour
        rel = self.path.split("?", 1)[0].lstrip("/")
        rng = self.headers.get("Range")
        with b.lock:
            b.requests.append((rel, rng))
        if rel in b.overrides:
            data = b.overrides[rel]
        else:
            path = (self.root / rel).resolve()
            if self.root.resolve() not in path.parents or not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
        start = 0
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        endless = b.endless_suffix is not None and rel.endswith(b.endless_suffix)
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if endless:
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        with b.lock:
            cut = b.cuts_left > 0 and b.cut_after_bytes > 0 and len(body) > b.cut_after_bytes
            if cut:
                b.cuts_left -= 1
        if cut:
            body = body[: b.cut_after_bytes]
        self._send(rel, body)
        if endless:
            junk = b"\0" * 65536
            for _ in range(64):  # 4 MiB of junk: far beyond any target length
                if not self._send(rel, junk):
                    break
            self.close_connection = True
        if cut:
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)

    def _send(self, rel: str, data: bytes) -> bool:
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        with self.behaviour.lock:
            self.behaviour.bytes_served[rel] = self.behaviour.bytes_served.get(rel, 0) + len(data)
        return True


class RepoServer:
    """Serve ``root`` (a TUF repository directory) on 127.0.0.1 in a background thread."""

    def __init__(self, root: Path, behaviour: ServerBehaviour | None = None) -> None:
        self.behaviour = behaviour or ServerBehaviour()
        handler = type("Handler", (_Handler,), {"root": Path(root), "behaviour": self.behaviour})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def tuf_client(repo: str | Path, cache_dir: Path, trusted_root: bytes):  # -> tuf.ngclient.Updater
    """A real python-tuf client with its own cache, trusting ``trusted_root`` (refreshed by the caller)."""
    from driveloop.edge.fetcher import ResumableFetcher
    from driveloop.edge.updater import repo_urls
    from tuf.ngclient import Updater

    meta_url, targets_url = repo_urls(repo)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return Updater(str(cache_dir), meta_url, str(cache_dir / "targets"), targets_url,
                   ResumableFetcher(cache_dir / "dl"), bootstrap=trusted_root)


@contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    """Run an ASGI app (the fleet server) with uvicorn on an ephemeral 127.0.0.1 port; yields its URL."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
