"""The object store on a real S3 API: moto's standalone server (``moto_server``, from ``moto[server]``) on a
loopback port, started and stopped (by its pid) here; s3fs talks to it through ``AWS_ENDPOINT_URL``.

- ingest → pipeline → registry with ``DRIVELOOP_STORE_URL=s3://…``: vehicles' segments land in the bucket
  (content-addressed keys), the pipeline reads them back from S3 and registers a candidate;
- an object of three parts goes up as one multipart upload and reads back byte for byte;
- dropped connections are retried (a loopback proxy resets the first connections), and when every
  attempt fails the error is one StorageError line; a missing bucket is refused in one line, exit 5.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from driveloop.cli import main
from driveloop.cloud.store import S3_MIN_PART_BYTES, ObjectStore
from driveloop.core.exceptions import StorageError
from tests.fakes.serve import driveloop_command

pytestmark = pytest.mark.slow
BUCKET = "driveloop-fleet"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (its endpoint URL) with the bucket ``BUCKET``."""
    import boto3

    port = _free_port()
    exe = shutil.which("moto_server") or pytest.fail("moto_server not installed (pip install 'moto[server]')")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@pytest.fixture
def s3_env(moto: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """This process talks to moto (a fresh s3fs instance: its endpoint comes from the environment)."""
    import s3fs

    for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": moto}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    return moto


def _keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def test_ingest_pipeline_registry_on_s3(s3_env: str, random_home: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from driveloop.cloud.catalog import Catalog
    from driveloop.cloud.registry import Registry

    home = tmp_path / "home"
    shutil.copytree(random_home, home)
    url = f"s3://{BUCKET}/loop"
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    monkeypatch.setenv("DRIVELOOP_STORE_URL", url)
    uploaded = 0
    for scenario, seed in (("ccrs-30", 11), ("ccrs-60", 13)):
        assert main(["drive", "--scenario", scenario, "--vehicles", "2", "--duration", "10", "--seed", str(seed),
                     "--model", "1", "--json"]) == 0
        drove = json.loads(capsys.readouterr().out)
        assert drove["upload"]["uploaded"] == drove["segments"] > 0
        uploaded += drove["segments"]
    cat = Catalog(f"sqlite:///{home / 'cloud' / 'catalog.db'}")
    shas = sorted(r.sha256 for r in cat.new_segments())
    cat.close()
    assert len(shas) == uploaded
    assert _keys(s3_env, "loop/") == sorted(f"loop/segments/{s[:2]}/{s}.mcap" for s in shas)  # in S3, nowhere else
    assert not (home / "cloud" / "store").exists()

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([*driveloop_command(), "cloud", "pipeline", "run",
                           "--json", "--epochs", "1", "--suite-classes", "ccrs", "--suite-duration", "4"],
                          env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)
    assert r["status"] == "ok" and r["segments_used"] == uploaded and r["rejected"] == []
    with Registry(home / "registry") as reg:
        cand = reg.get(r["candidate"])
    assert cand.manifest.parent_version == 1 and cand.manifest.dataset_version == r["dataset_version"]


def test_multipart_upload_round_trips(s3_env: str, tmp_path: Path) -> None:
    import boto3

    data = os.urandom(2 * S3_MIN_PART_BYTES + 12345)  # three parts of 5 MiB (the last one short)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store = ObjectStore(f"s3://{BUCKET}/multipart", part_size_bytes=S3_MIN_PART_BYTES)
    sha = store.put_file(src)
    assert sha == hashlib.sha256(data).hexdigest() and store.size(sha) == len(data)
    head = boto3.client("s3", endpoint_url=s3_env, **_boto_credentials()).head_object(
        Bucket=BUCKET, Key=f"multipart/segments/{sha[:2]}/{sha}.mcap")
    assert head["ETag"].strip('"').endswith("-3")  # S3 marks a multipart object by its part count
    out = tmp_path / "back.bin"
    with open(out, "wb") as f:
        assert store.copy_to(sha, f) == len(data)
    assert out.read_bytes() == data
    assert store.put_file(src) == sha and _keys(s3_env, "multipart/") == [f"multipart/segments/{sha[:2]}/{sha}.mcap"]


class ResettingProxy:
    """A loopback TCP proxy to ``target`` that resets its first ``drop`` connections (a dropped link)."""

    def __init__(self, target_port: int, drop: int) -> None:
        self.target_port, self.drop, self.dropped, self.passed = target_port, drop, 0, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if self.dropped < self.drop:
                self.dropped += 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()  # RST: the client sees its connection reset
                continue
            self.passed += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while chunk := a.recv(65536):
                b.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.server.close()


@pytest.mark.parametrize(("drop", "reached"), [(2, True), (10**6, False)], ids=["retried", "gives-up"])
def test_dropped_connections_are_retried_then_one_line(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       drop: int, reached: bool) -> None:
    """Every request goes through a proxy that resets its first ``drop`` connections: with two resets the
    client's retries get through (bucket check and upload); with every one reset, one StorageError line."""
    import s3fs

    proxy = ResettingProxy(int(s3_env.rsplit(":", 1)[1]), drop)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    s3fs.S3FileSystem.clear_instance_cache()
    src = tmp_path / "seg.bin"
    src.write_bytes(os.urandom(100_000))
    try:
        if reached:
            sha = ObjectStore(f"s3://{BUCKET}/flaky", max_attempts=3).put_file(src)
            assert proxy.dropped == drop and proxy.passed >= 1
            assert _keys(s3_env, "flaky/") == [f"flaky/segments/{sha[:2]}/{sha}.mcap"]
        else:
            with pytest.raises(StorageError) as e:
                ObjectStore(f"s3://{BUCKET}/flaky", max_attempts=3)
            assert proxy.dropped >= 3 and proxy.passed == 0
            assert len(str(e.value).splitlines()) == 1 and str(e.value).startswith("cannot reach object store")
    finally:
        proxy.close()
        s3fs.S3FileSystem.clear_instance_cache()


def test_missing_bucket_is_one_line_and_exit_5(s3_env: str, random_home: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        ObjectStore("s3://no-such-bucket/segments")
    home = tmp_path / "home"
    shutil.copytree(random_home, home)
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    monkeypatch.setenv("DRIVELOOP_STORE_URL", "s3://no-such-bucket/segments")
    assert main(["drive", "--vehicles", "1", "--duration", "1", "--json"]) == StorageError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bucket 'no-such-bucket' does not exist" in err
    assert not list(home.rglob("*.mcap"))  # refused when the cloud was opened, before anything was driven
