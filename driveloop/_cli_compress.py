"""``driveloop models compress VERSION --method distill|int8 [--json]``: a compressed variant through both gates.

The variant (cloud/compress.py) is registered as a child of VERSION with ``variant`` {method, parent} in its
manifest, ``validated`` only when it is faster than the fp32 parent (latency gate, measured here, now) and
passes the closed-loop gate; otherwise ``rejected`` with the measured reasons. The report is printed either
way; the exit code is 0 for a completed gate, whatever its verdict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import typer

from driveloop._cli_cloud import models_app
from driveloop._jsonout import dumps


def _print(r: dict[str, Any]) -> None:
    verdict = "PASSED" if r["gate"]["passed"] else "REJECTED"
    typer.echo(f"v{r['variant']}: {r['method']} variant of v{r['parent']} — {verdict} ({r['stage']})")
    typer.echo(f"  params {r['params']} (parent {r['parent_params']}), size {r['size_bytes']} B "
               f"(parent {r['parent_size_bytes']} B)")
    for n, b in r["gate"]["latency"]["batches"].items():
        typer.echo(f"  batch {n}: p50 {b['variant_p50_us']:.1f} µs vs {b['parent_p50_us']:.1f} µs (x{b['p50_ratio']:.2f}), "
                   f"p99 {b['variant_p99_us']:.1f} µs vs {b['parent_p99_us']:.1f} µs (x{b['p99_ratio']:.2f})")
    closed = r["gate"]["closed_loop"]
    typer.echo(f"  closed loop vs v{r['gate']['baseline_version']}: {'passed' if closed['passed'] else 'failed'}")
    for reason in r["gate"]["reasons"]:
        typer.echo(f"  - {reason}")


@models_app.command("compress")
def compress_cmd(
    version: str = typer.Argument(..., help="The parent: a validated or released version (3 or v3)."),
    method: str = typer.Option(..., "--method", help="distill (smaller student) or int8 (static QDQ quantization)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    fleet_batch: int = typer.Option(8, "--fleet-batch", min=1, help="The fleet's batch size for the latency gate."),
    iters: int = typer.Option(2000, "--iters", min=10, help="Timed calls per model and batch size."),
    suite_classes: str = typer.Option("", "--suite-classes",
                                      help="Comma-separated classes of the closed-loop gate (default: the parent's suite)."),
    suite_duration_s: float = typer.Option(30.0, "--suite-duration", min=1.0,
                                           help="Simulated seconds per held-out vehicle (with --suite-classes)."),
    suite_vehicles: int = typer.Option(3, "--suite-vehicles", min=1, help="Vehicles per scenario (with --suite-classes)."),
    min_reduction: float = typer.Option(0.0, "--min-reduction", min=0.0, max=0.99,
                                        help="Required fall of suite interventions/hour vs the gate's baseline."),
    epochs: int = typer.Option(60, "--epochs", min=1, help="Distillation epochs."),
    max_segments: int = typer.Option(64, "--max-segments", min=1, help="Cataloged segments read for frames."),
) -> None:
    """Distil or quantize a model; gate the variant on latency (vs the parent) and in closed loop."""
    from driveloop._cli_fl import _suite  # the one parser of --suite-classes
    from driveloop.cloud.compress import CompressConfig, check_method, compress
    from driveloop.cloud.distill import DistillConfig
    from driveloop.cloud.evaluation import GateTolerances
    from driveloop.cloud.latency_gate import LatencyGateConfig
    from driveloop.settings import load_settings

    check_method(method)  # a bad method is a one-line error before anything heavy runs
    suite = None
    if suite_classes:
        suite = dataclasses.replace(_suite(suite_classes, suite_duration_s), vehicles_per_scenario=suite_vehicles)
    config = CompressConfig.from_settings(
        load_settings(), max_segments=max_segments, suite=suite,
        tolerances=GateTolerances(min_suite_iph_reduction_frac=min_reduction),
        latency=LatencyGateConfig(fleet_batch=fleet_batch, iters=iters), distill=DistillConfig(epochs=epochs),
    )
    report = compress(config, version, method).to_dict()
    if as_json:
        typer.echo(dumps(report))
    else:
        _print(report)
