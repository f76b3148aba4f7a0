"""Shift commands: ``driveloop cloud shift watch|status``.

``watch`` runs the shift-detector service (``cloud.stream_sinks.ShiftDetector``) on the live stream: the broker is
``DRIVELOOP_NATS_URL`` or the embedded one ``driveloop stream serve`` runs (``cli._broker``); campaigns go through
the local cloud's ingest service, approved by ``DRIVELOOP_CAMPAIGN_AUTO_APPROVE`` (or ``--auto-approve``).
``status`` reads what the service last wrote (``<home>/cloud/shift/status.json``) and the shift campaigns' current
state from the catalog (a person may have approved one since). ``driveloop stream serve`` runs the same detector
(:func:`live_detector`) beside its broker, unless told ``--no-shift``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import typer

from driveloop._jsonout import dumps
from driveloop.core.exceptions import ConfigError

from driveloop._cli_cloud import cloud_app

logger = logging.getLogger(__name__)

shift_app = typer.Typer(help="Noticing a shift in the fleet's world from the live stream.", no_args_is_help=True)
cloud_app.add_typer(shift_app, name="shift")

_JSON = typer.Option(False, "--json", help="Print JSON instead of text.")
CAMPAIGN_PREFIX = "shift-"  # cloud.shift.campaign_for names a shift's campaign shift-<class>


def shift_dir(settings: Any) -> Path:
    """Where the shift detector keeps its baseline and status."""
    return Path(settings.cloud_dir) / "shift"


# The live detector's defaults (``watch``'s options, and ``stream serve``'s detector).
WINDOW_S = 900.0
REFERENCE_S = 600.0


def live_detector(settings: Any, auto_approve: str | None = None, window_s: float = WINDOW_S,
                  reference_s: float = REFERENCE_S) -> Any:
    """The shift-detector service over ``settings``' home: its baseline and status in :func:`shift_dir`, campaigns
    through the local cloud's ingest service, approved by ``auto_approve`` or else the operator's
    ``DRIVELOOP_CAMPAIGN_AUTO_APPROVE`` (one definition for ``shift watch`` and ``stream serve``)."""
    from driveloop._demo_shift import local_ingest
    from driveloop.cloud.shift import ApprovalPolicy, LiveShift
    from driveloop.cloud.stream_sinks import ShiftDetector

    approval = ApprovalPolicy.parse(settings.campaign_auto_approve if auto_approve is None else auto_approve)
    return ShiftDetector(shift_dir(settings), lambda: local_ingest(settings), approval,
                         live=LiveShift(window_s=window_s, reference_s=reference_s))


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"shift status {path} is unreadable ({e}); `driveloop cloud shift watch` rewrites it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"shift status {path} is not a JSON object")
    return data


def shift_status(settings: Any) -> dict[str, Any]:
    """The detector's last status and every shift campaign in the catalog, with its current state."""
    from driveloop._demo_shift import local_ingest
    from driveloop.cloud.campaigns import to_wire

    status = _read_status(shift_dir(settings) / "status.json")
    service = local_ingest(settings)
    try:
        campaigns = [to_wire(c) for c in service.catalog.campaigns() if c.spec.name.startswith(CAMPAIGN_PREFIX)]
    finally:
        service.catalog.close()
    return {"detector": status, "campaigns": [
        {"id": c["id"], "class": c["name"][len(CAMPAIGN_PREFIX):], "state": c["state"], "priority": c["priority"],
         "condition": c["condition"], "created_at_s": c["created_at_s"], "expires_at_s": c["expires_at_s"]}
        for c in campaigns]}


@shift_app.command("status")
def status(as_json: bool = _JSON) -> None:
    """Per class live intervention rates against the baseline, and the shift campaigns."""
    from driveloop.settings import load_settings

    report = shift_status(load_settings())
    if as_json:
        typer.echo(dumps(report))
        return
    det = report["detector"]
    if det is None:
        typer.echo("no shift detector has run here yet (start one: driveloop cloud shift watch)")
    else:
        base = det.get("baseline")
        age = time.time() - float(det.get("updated_at") or 0.0)
        typer.echo(f"detector status {age:.0f} s old; window {det['window_s']:.0f} s; baseline "
                   + ("not taken yet (reference period)" if base is None
                      else f"{base['fleet']:.1f}/h fleet-wide ({base['source']})"))
        typer.echo(f"{'class':<14} {'hours':>8} {'interv.':>8} {'coll.':>6} {'per h':>8} {'baseline':>9} {'limit':>8}")
        for cls, r in det["classes"].items():
            b = "-" if r["baseline_per_hour"] is None else f"{r['baseline_per_hour']:.1f}"
            t = "-" if r["threshold_per_hour"] is None else f"{r['threshold_per_hour']:.1f}"
            typer.echo(f"{cls:<14} {r['exposure_h']:>8.3f} {r['interventions']:>8} {r['collisions']:>6} "
                       f"{r['per_hour']:>8.1f} {b:>9} {t:>8}")
    if not report["campaigns"]:
        typer.echo("no shift campaigns")
    for c in report["campaigns"]:
        typer.echo(f"campaign {c['id']} for {c['class']}: {c['state']} (priority {c['priority']}) {c['condition']}")


@shift_app.command("watch")
def watch(
    seconds: float = typer.Option(0.0, "--seconds", min=0.0, max=30 * 24 * 3600.0,
                                  help="Stop after this long (0: until Ctrl-C/SIGTERM)."),
    auto_approve: str | None = typer.Option(None, "--auto-approve",
                                            help="Classes whose campaigns are approved ('*', 'fog,aggressive', '': "
                                                 "none); default DRIVELOOP_CAMPAIGN_AUTO_APPROVE."),
    window_s: float = typer.Option(WINDOW_S, "--window-s", min=10.0, max=7 * 24 * 3600.0),
    reference_s: float = typer.Option(REFERENCE_S, "--reference-s", min=10.0, max=7 * 24 * 3600.0,
                                      help="Without a stored baseline: how much of the stream is the reference."),
    as_json: bool = _JSON,
) -> None:
    """Run the shift detector on the live stream; a class whose intervention rate rises gets a campaign."""
    from driveloop._cli_stream import _broker
    from driveloop.cloud.stream_sinks import SinkRunner, StreamMetrics
    from driveloop.settings import load_settings

    settings = load_settings()
    detector = live_detector(settings, auto_approve, window_s, reference_s)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    metrics = StreamMetrics()
    with _broker(settings) as (url, user, password):
        runner = SinkRunner(url, detector.consumers(), metrics, user, password).start()
        logger.info("shift detector on %s (auto-approve: %s)", url,
                    ",".join(sorted(detector.approval.classes)) or "none")
        deadline = time.monotonic() + seconds if seconds > 0 else None
        try:
            while not stop.wait(0.5) and (deadline is None or time.monotonic() < deadline):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            runner.stop()
            detector.flush()
    report = detector.status()
    if as_json:
        typer.echo(dumps(report))
    else:
        typer.echo(f"{len(report['classes'])} class(es) seen, {len(report['campaigns'])} campaign(s) opened")
