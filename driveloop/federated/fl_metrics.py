"""The federated run's round outcomes as Prometheus metrics, in the text-file collector format.

An FL run is a command, not a server: nothing stays up for Prometheus to scrape. So after every round
the run writes ``<run_dir>/metrics.prom`` (atomically, from the checkpointed state, so a resumed run
continues its counts), which node_exporter's text-file collector (or any scraper pointed at the file)
exposes; the alert ``DriveloopFlRoundSkipped`` reads ``driveloop_fl_rounds_total{outcome="skipped"}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile

__all__ = ["METRICS_FILE", "write_round_metrics"]

METRICS_FILE = "metrics.prom"


def write_round_metrics(run_dir: Path | str, state: Mapping[str, Any], now_s: float) -> Path:
    """``driveloop_fl_rounds_total{run, outcome=completed|skipped}``, ``driveloop_fl_round_accepted`` (the
    last round's accepted updates) and ``driveloop_fl_last_round_timestamp_seconds``, for ``state``'s rounds."""
    run = Path(run_dir).name
    registry = CollectorRegistry()
    rounds = Counter("driveloop_fl_rounds", "Federated rounds by outcome.", ["run", "outcome"], registry=registry)
    records = list(state.get("rounds", []))
    skipped = sum(1 for r in records if r.get("skipped"))
    rounds.labels(run, "completed").inc(len(records) - skipped)
    rounds.labels(run, "skipped").inc(skipped)
    accepted = Gauge("driveloop_fl_round_accepted", "Updates accepted in the last round.", ["run"], registry=registry)
    accepted.labels(run).set(float(records[-1].get("accepted", 0)) if records else 0.0)
    last = Gauge("driveloop_fl_last_round_timestamp_seconds", "When the last round ended (Unix s).", ["run"],
                 registry=registry)
    last.labels(run).set(now_s)
    path = Path(run_dir) / METRICS_FILE
    write_to_textfile(str(path), registry)  # temp file + rename: a scraper never reads half of it
    return path
