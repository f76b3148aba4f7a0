"""Live stream commands: ``driveloop stream serve|status|tail|bench``.

The broker is ``DRIVELOOP_NATS_URL`` when set; otherwise the embedded nats-server under ``<home>/nats``:
``serve`` runs it in the foreground (its URL in ``<home>/nats/server.json`` while it runs, so the other
commands find it); ``status``/``tail`` without a running one start it for the command's own duration on the
same store, and stop it (by pid) before returning. The CLI connects as the service user ``svc-cli``, whose
password the cloud keeps in ``<home>/nats/svc-cli.secret`` (0600): the broker itself stores only hashes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from driveloop._jsonout import dumps
from driveloop.cli import app
from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import ConfigError, StreamError

logger = logging.getLogger(__name__)

stream_app = typer.Typer(help="The live data plane: NATS JetStream broker, status, tail, bench.", no_args_is_help=True)
app.add_typer(stream_app, name="stream")

_JSON = typer.Option(False, "--json", help="Print JSON instead of text.")
SERVICE = "cli"


def _service_password(nats_dir: Path) -> tuple[Any, str]:
    """The broker's users and the CLI service password (issued once, kept 0600 beside the hashes)."""
    from driveloop.cloud.broker import Credentials

    creds = Credentials(nats_dir)
    secret = nats_dir / f"svc-{SERVICE}.secret"
    if secret.is_file() and any(u.name == f"svc-{SERVICE}" for u in creds.users):
        return creds, secret.read_text().strip()
    password = creds.issue_service(SERVICE)
    creds.save()
    write_atomic(secret, (password + "\n").encode(), mode=0o600)
    return creds, password


def _running_server(nats_dir: Path) -> str | None:
    info = nats_dir / "server.json"
    try:
        data = json.loads(info.read_text())
        os.kill(int(data["pid"]), 0)
        return str(data["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def _broker(settings: Any) -> Iterator[tuple[str, str | None, str | None]]:
    """(url, user, password): the configured cluster, the running embedded server, or one started for now."""
    from driveloop.cloud.broker import EmbeddedBroker

    if settings.nats_url:
        yield settings.nats_url, os.environ.get("DRIVELOOP_NATS_USER"), os.environ.get("DRIVELOOP_NATS_PASSWORD")
        return
    nats_dir = settings.nats_dir
    nats_dir.mkdir(parents=True, exist_ok=True)
    creds, password = _service_password(nats_dir)
    url = _running_server(nats_dir)
    if url is not None:
        yield url, f"svc-{SERVICE}", password
        return
    with EmbeddedBroker.embedded(nats_dir, creds.users) as broker:
        asyncio.run(_ensure(broker.url, f"svc-{SERVICE}", password))
        yield broker.url, f"svc-{SERVICE}", password


async def _ensure(url: str, user: str | None, password: str | None, replicas: int = 1) -> None:
    from driveloop.cloud.broker import ensure_streams

    nc = await _connect(url, user, password)
    try:
        await ensure_streams(nc.jetstream(), replicas=replicas)
    finally:
        await nc.close()


async def _connect(url: str, user: str | None, password: str | None) -> Any:
    import nats

    from driveloop.edge.stream_client import nats_servers

    async def quiet(e: Exception) -> None:  # the failure is reported once, below, as the CLI's one line
        logger.debug("broker %s: %s", url, e)

    try:
        return await nats.connect(nats_servers(url), user=user, password=password, connect_timeout=3,
                                  max_reconnect_attempts=1, allow_reconnect=False, error_cb=quiet)
    except Exception as e:  # noqa: BLE001 (one line for the CLI)
        raise StreamError(f"cannot connect to the broker at {url}: {type(e).__name__}: {e}") from e


def _serve_consumers(settings: Any, shift: bool) -> list[Any]:
    """The cloud services ``serve`` runs on its broker's stream, each built before the broker starts (a bad
    config is a one-line error, not a half-started server): the live shift detector (``cloud shift watch``'s,
    its approval policy ``DRIVELOOP_CAMPAIGN_AUTO_APPROVE``) unless ``--no-shift``."""
    if not shift:
        return []
    from driveloop._cli_shift import live_detector

    return [live_detector(settings)]


@stream_app.command("serve")
def serve(port: int = typer.Option(4222, "--port", min=0, max=65535, help="Client port on 127.0.0.1 (0: any)."),
          replicas: int = typer.Option(1, "--replicas", help="Stream replicas (1 here; 3 in a cluster)."),
          shift: bool = typer.Option(True, "--shift/--no-shift",
                                     help="Run the live shift detector (as `driveloop cloud shift watch`) on the "
                                          "stream; its campaigns approved by DRIVELOOP_CAMPAIGN_AUTO_APPROVE.")) -> None:
    """Run the embedded broker in the foreground (streams created) with the live shift detector; Ctrl-C stops it."""
    from driveloop.cloud.broker import EmbeddedBroker
    from driveloop.cloud.stream_sinks import SinkRunner, StreamMetrics
    from driveloop.settings import load_settings

    settings = load_settings()
    if settings.nats_url:
        raise ConfigError("DRIVELOOP_NATS_URL is set: the broker is that cluster, not an embedded one")
    nats_dir = settings.nats_dir
    nats_dir.mkdir(parents=True, exist_ok=True)
    if _running_server(nats_dir):
        raise StreamError(f"an embedded broker already runs for {nats_dir} (see server.json)")
    creds, password = _service_password(nats_dir)
    services = _serve_consumers(settings, shift)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmbeddedBroker.embedded(nats_dir, creds.users, port=port or None) as broker:
        asyncio.run(_ensure(broker.url, f"svc-{SERVICE}", password, replicas))
        runner = None
        if services:
            specs = [spec for service in services for spec in service.consumers()]
            runner = SinkRunner(broker.url, specs, StreamMetrics(), f"svc-{SERVICE}", password).start()
        info = nats_dir / "server.json"
        write_atomic(info, dumps({"url": broker.url, "pid": os.getpid(), "server_pid": broker.pid}).encode())
        print(broker.url, flush=True)
        try:
            while not stop.wait(0.5) and broker.running():
                pass
        except KeyboardInterrupt:
            pass
        finally:
            info.unlink(missing_ok=True)
            if runner is not None:
                runner.stop()
            for service in services:
                service.flush()


async def _status(url: str, user: str | None, password: str | None) -> dict[str, Any]:
    nc = await _connect(url, user, password)
    try:
        js = nc.jetstream()
        streams = []
        for s in await js.streams_info():
            consumers = []
            for c in await js.consumers_info(s.config.name):
                consumers.append({"name": c.name, "lag": c.num_pending, "ack_pending": c.num_ack_pending,
                                  "delivered": c.delivered.stream_seq if c.delivered else 0})
            streams.append({
                "name": s.config.name, "subjects": list(s.config.subjects or []), "messages": s.state.messages,
                "bytes": s.state.bytes, "first_seq": s.state.first_seq, "last_seq": s.state.last_seq,
                "replicas": s.config.num_replicas, "consumers": sorted(consumers, key=lambda c: c["name"]),
            })  # fmt: skip
        return {"url": url, "streams": sorted(streams, key=lambda s: s["name"])}
    finally:
        await nc.close()


@stream_app.command("status")
def status(as_json: bool = _JSON) -> None:
    """Streams with their messages, bytes and consumers (with lag)."""
    from driveloop.settings import load_settings

    with _broker(load_settings()) as (url, user, password):
        report = asyncio.run(_status(url, user, password))
    if as_json:
        print(dumps(report))
        return
    print(f"broker {report['url']}")
    for s in report["streams"]:
        print(f"{s['name']:<10} {s['messages']:>9} msgs {s['bytes']:>12} bytes  {','.join(s['subjects'])}")
        for c in s["consumers"]:
            print(f"  consumer {c['name']}: lag {c['lag']}, ack pending {c['ack_pending']}")


def _payload(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return {"base64": base64.b64encode(data).decode()}


async def _tail(url: str, user: str | None, password: str | None, subject: str, count: int) -> list[dict[str, Any]]:
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    nc = await _connect(url, user, password)
    try:
        js = nc.jetstream()
        try:
            stream = await js.find_stream_name_by_subject(subject)
        except NotFoundError as e:
            raise StreamError(f"no stream holds subject {subject!r}") from e
        last = (await js.stream_info(stream)).state.last_seq
        window = max(count * 4, 64)
        while True:  # widen the window back from the end until it holds `count` matches (or everything)
            start = max(1, last - window + 1)
            config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=start, filter_subject=subject, inactive_threshold=10.0)
            psub = await js.pull_subscribe(subject, stream=stream, config=config)
            rows: list[dict[str, Any]] = []
            try:
                while True:
                    try:
                        msgs = await psub.fetch(500, timeout=0.5)
                    except (NatsTimeout, asyncio.TimeoutError):
                        break
                    for m in msgs:
                        rows.append({"subject": m.subject, "seq": m.metadata.sequence.stream,
                                     "time": m.metadata.timestamp.isoformat() if m.metadata.timestamp else None,
                                     "data": _payload(m.data)})
                    if not msgs or msgs[-1].metadata.num_pending == 0:
                        break
            finally:
                await psub.unsubscribe()
            if len(rows) >= count or start == 1:
                return rows[-count:]
            window *= 4
    finally:
        await nc.close()


@stream_app.command("tail")
def tail(subject: str = typer.Argument(..., help="Subject or wildcard, e.g. 'tel.>' or 'evt.v1.aeb'."),
         count: int = typer.Option(10, "--count", "-n", min=1, max=100_000, help="How many of the last messages."),
         as_json: bool = _JSON) -> None:
    """The last COUNT stored messages on SUBJECT, oldest first."""
    from driveloop.settings import load_settings

    if not subject or any(c.isspace() for c in subject) or len(subject) > 256:
        raise ConfigError(f"invalid subject {subject!r:.80}")
    with _broker(load_settings()) as (url, user, password):
        rows = asyncio.run(_tail(url, user, password, subject, count))
    if as_json:
        print(dumps({"subject": subject, "messages": rows}))
        return
    for r in rows:
        print(f"{r['seq']:>8} {r['subject']} {json.dumps(r['data'], separators=(',', ':'))}")


@stream_app.command("bench")
def bench(vehicles: int = typer.Option(100, "--vehicles", min=1, max=5000),
          seconds: float = typer.Option(10.0, "--seconds", min=0.5, max=3600),
          rate_hz: float = typer.Option(10.0, "--rate-hz", min=0.1, max=100),
          sync: str = typer.Option("always", "--sync", help="JetStream sync_interval: 'always' or a duration (1s)."),
          hazards: int = typer.Option(20, "--hazards", min=0, max=1000),
          processes: int | None = typer.Option(None, "--processes", min=1, max=64, show_default=False,
                                               help="Client processes the simulated fleet is sharded over "
                                                    "(default: one per CPU, at most one per vehicle)."),
          as_json: bool = _JSON) -> None:
    """Simulated fleet against an embedded broker (or DRIVELOOP_NATS_URL): acked rate, ack p99, loss, hazard p99."""
    from driveloop._stream_bench import default_processes, run_bench
    from driveloop.settings import load_settings

    if sync != "always" and not (sync[:-1].replace(".", "", 1).isdigit() and sync[-1] in "sm"):
        raise ConfigError(f"--sync must be 'always' or a duration like 1s, got {sync!r}")
    result = run_bench(vehicles, seconds, url=load_settings().nats_url, rate_hz=rate_hz, sync_interval=sync,
                       hazards=hazards, processes=processes or default_processes(vehicles))
    if as_json:
        print(dumps(result))
        return
    for k, v in result.items():
        print(f"{k:<28} {v}")
