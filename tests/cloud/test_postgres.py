"""The catalog against a real PostgreSQL server (issue 5 acceptance 4): a throwaway cluster is created
with the Debian ``postgresql`` binaries (initdb + pg_ctl, as the ``postgres`` user when run as root),
listening on 127.0.0.1 only. Every catalog test of test_catalog.py reruns here on a fresh database,
plus one upload through the ingest service. Skipped only when the server binaries are not installed.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from driveloop.cloud.catalog import Catalog
from driveloop.edge.spool import Spool
from driveloop.cloud.local_transport import LocalTransport
from tests.cloud.test_catalog import (  # noqa: F401  (re-collected here with the PostgreSQL fixture)
    test_add_segment_is_idempotent_and_round_trips,
    test_campaigns_round_trip,
    test_concurrent_inserts_of_same_segment_land_once,
    test_new_segments_and_mark_consumed,
    test_segment_queries,
    test_upload_lifecycle,
    test_upload_needs_a_known_vehicle,
    test_vehicles,
)
from tests.fakes.transport import record_synthetic_segments

_BIN_DIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
_BIN = Path(_BIN_DIRS[-1]) if _BIN_DIRS else None
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        _BIN is None or not (_BIN / "initdb").exists() or not (_BIN / "pg_ctl").exists(),
        reason="PostgreSQL server binaries not installed (Debian package `postgresql`; .ci/run installs it)",
    ),
]
_USER = "driveloop"
_counter = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the ``postgres`` account the package created."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A running throwaway PostgreSQL cluster; yields its base URL (without database)."""
    assert _BIN is not None
    root = Path(tempfile.mkdtemp(prefix="driveloop-pg-"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, port = root / "data", _free_port()
    run = lambda args: subprocess.run(_as_server_user(args), check=True, capture_output=True, text=True)
    try:
        run([str(_BIN / "initdb"), "-D", str(data), "-U", _USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
        run([str(_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "start",
             "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"])
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {e.stderr}") from e
    try:
        yield f"postgresql+psycopg://{_USER}@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_server_user([str(_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def _fresh_database(server: str) -> str:
    import psycopg

    name = f"catalog_{os.getpid()}_{next(_counter)}"
    dsn = server.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


@pytest.fixture
def catalog(server: str) -> Iterator[Catalog]:
    """Overrides test_catalog's SQLite fixture: the same tests, on PostgreSQL."""
    cat = Catalog(_fresh_database(server))
    assert cat.url.startswith("postgresql+psycopg://")
    yield cat
    cat.close()


def test_ingest_on_postgres(server: str, tmp_path: Path) -> None:
    """A real segment through the ingest service into a PostgreSQL catalog (the scale-out path)."""
    spool = Spool(tmp_path / "spool", 10**9)
    (path,) = record_synthetic_segments(spool, "veh-pg", 1, ticks_per_segment=20, seed=4)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    local = LocalTransport.under(tmp_path / "cloud", "veh-pg", catalog_url=_fresh_database(server))
    status = local.start(sha, len(data), path.name)
    assert status.upload_id is not None
    status = local.send_chunk(status.upload_id, 0, data[:5000])
    status = local.send_chunk(status.upload_id, 5000, data[5000:])
    assert status.confirmed and status.sha256 == sha
    (rec,) = local.service.catalog.new_segments()
    assert (rec.sha256, rec.meta.vehicle, rec.meta.n_ticks, rec.size) == (sha, "veh-pg", 20, len(data))
    assert local.start(sha, len(data), path.name).state == "exists"
    local.close()
