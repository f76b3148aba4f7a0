"""The embedded broker: started and stopped by its owner, users hashed, vehicles confined to their subjects."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from driveloop.cloud.broker import Credentials, EmbeddedBroker, vehicle_inbox
from driveloop.contracts.stream import encode
from tests.stream.conftest import pid_alive, tel


def test_embedded_start_stop_leaves_no_process(tmp_path: Path) -> None:
    with EmbeddedBroker.embedded(tmp_path / "nats") as b:
        pid = b.pid
        assert pid is not None and pid_alive(pid)
        assert b.monitor("varz")["jetstream"]["config"]["sync_interval"] is not None
    assert not pid_alive(pid)
    assert (tmp_path / "nats" / "jetstream").is_dir()


def _server_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.parametrize(("ours", "expected"), [(None, "400"), ("150", "150")])
def test_the_server_runs_with_the_spec_gogc_unless_the_environment_sets_one(tmp_path: Path, monkeypatch, ours,
                                                                           expected) -> None:
    if ours is None:
        monkeypatch.delenv("GOGC", raising=False)
    else:
        monkeypatch.setenv("GOGC", ours)
    with EmbeddedBroker.embedded(tmp_path / "nats") as b:
        assert b.pid is not None
        assert _server_env(b.pid)["GOGC"] == expected


def test_credentials_are_stored_hashed(tmp_path: Path) -> None:
    creds = Credentials(tmp_path)
    password = creds.issue_vehicle("v1")
    creds.save()
    stored = (tmp_path / "users.json").read_text()
    assert password not in stored and "$2b$" in stored
    assert oct((tmp_path / "users.json").stat().st_mode & 0o777) == "0o600"
    again = Credentials(tmp_path)
    assert [u.name for u in again.users] == ["v1"] and again.users[0].role == "vehicle"


async def _count(url: str, user: str, password: str, subject: str) -> int:
    nc = await nats.connect(url, user=user, password=password)
    try:
        info = await nc.jetstream().stream_info("TELEMETRY", subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))
    finally:
        await nc.close()


def test_vehicle_cannot_publish_as_another(secured) -> None:
    broker, passwords, service = secured
    errors: list[str] = []

    async def run() -> None:
        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        nc = await nats.connect(broker.url, user="v1", password=passwords["v1"], inbox_prefix=vehicle_inbox("v1"),
                                error_cb=on_error)
        js = nc.jetstream()
        ack = await js.publish("tel.v1", encode(tel("v1", 0)))  # its own subject: stored
        assert ack.stream == "TELEMETRY"
        await nc.publish("tel.v~2", encode(tel("v.2", 0)))  # forged: refused by the server
        await nc.flush()
        await asyncio.sleep(0.3)
        await nc.close()

    asyncio.run(run())
    assert any('permissions violation for publish to "tel.v~2"' in e for e in errors)
    assert asyncio.run(_count(broker.url, "svc-test", service, "tel.v~2")) == 0
    assert asyncio.run(_count(broker.url, "svc-test", service, "tel.v1")) == 1


def test_vehicle_cannot_read_other_vehicles_telemetry(secured) -> None:
    broker, passwords, _ = secured
    errors: list[str] = []

    async def run() -> None:
        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        nc = await nats.connect(broker.url, user="v1", password=passwords["v1"], inbox_prefix=vehicle_inbox("v1"),
                                error_cb=on_error)
        await nc.subscribe("tel.>")
        await nc.subscribe("_INBOX.v~2.>")  # another vehicle's replies
        await nc.subscribe("haz.>")  # allowed
        await nc.flush()
        await asyncio.sleep(0.3)
        await nc.close()

    asyncio.run(run())
    assert any('permissions violation for subscription to "tel.>"' in e for e in errors)
    assert any('subscription to "_inbox.v~2.>"' in e.lower() for e in errors)  # nats-py lowercases it
    assert not any('"haz.>"' in e for e in errors)


def test_wrong_password_is_refused(secured) -> None:
    broker, _, _ = secured

    async def run() -> None:
        await nats.connect(broker.url, user="v1", password="wrong", allow_reconnect=False, max_reconnect_attempts=0)

    with pytest.raises(Exception, match="[Aa]uthorization"):
        asyncio.run(run())


def test_config_keeps_only_hashes(secured, tmp_path: Path) -> None:
    broker, passwords, service = secured
    conf = json.loads(broker.conf_path.read_text())
    text = broker.conf_path.read_text()
    assert all(p not in text for p in [*passwords.values(), service])
    assert conf["jetstream"]["sync_interval"] == "always" and conf["host"] == "127.0.0.1"


def test_server_dies_with_its_owner_even_on_kill_9(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from tests.stream.conftest import pid_alive

    code = ("from pathlib import Path\nfrom driveloop.cloud.broker import EmbeddedBroker\n"
            f"b = EmbeddedBroker.embedded(Path({str(tmp_path)!r})).start()\nprint(b.pid, flush=True)\n"
            "import time\ntime.sleep(120)\n")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        server = int(owner.stdout.readline())
        assert pid_alive(server)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 15
    while pid_alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(server)
