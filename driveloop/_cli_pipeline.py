"""``driveloop cloud pipeline run [--json]``: one iteration of the cloud data loop (cloud/pipeline.py).

New segments in the catalog become a dataset version, a fine-tuned candidate and a gate verdict; the
candidate is registered and becomes ``validated`` only if it passed. Progress shows each stage.
"""

from __future__ import annotations

import logging
from typing import Any

import typer

from driveloop._jsonout import dumps

from driveloop._cli_cloud import cloud_app

logger = logging.getLogger(__name__)

pipeline_app = typer.Typer(help="The Ray data pipeline: mine, label, fine-tune, gate, register.", no_args_is_help=True)
cloud_app.add_typer(pipeline_app, name="pipeline")



def _print_report(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if r["status"] == "no_new_segments":
        console.print("no new segments in the catalog: nothing to do")
        return
    console.print(
        f"segments: {r['segments_used']} used of {r['segments_new']} new, {len(r['rejected'])} rejected; "
        f"dataset {r['dataset_version']} ({r['samples']} samples: {r['hard_samples']} hard + {r['replay_samples']} replay"
        f"{', reused' if r['dataset_reused'] else ''})"
    )
    for bad in r["rejected"]:
        console.print(f"  skipped {bad['sha256'][:12]}…: {bad['reason']}")
    gate = r["gate"]
    table = Table(title=f"gate: v{r['base_version']} (current) vs v{r['candidate']} (candidate) — "
                        f"{'PASSED' if gate['passed'] else 'FAILED'}")
    for col in ("class", "iph base", "iph cand", "collisions", "progress base", "progress cand", "verdict"):
        table.add_column(col)
    for name, c in gate["classes"].items():
        b, k = c["baseline"], c["candidate"]
        failed = [n for n, ok in c["checks"].items() if not ok]
        table.add_row(name, f"{b['interventions_per_hour']:.1f}", f"{k['interventions_per_hour']:.1f}", str(k["collisions"]),
                      f"{b['progress']:.3f}", f"{k['progress']:.3f}", "ok" if not failed else ", ".join(failed))
    console.print(table)
    console.print(f"candidate v{r['candidate']}: {r['candidate_stage']}; timings (s): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items()))


@pipeline_app.command("run")
def run(
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Fine-tune epochs."),
    max_segments: int = typer.Option(0, "--max-segments", min=0, help="Use at most this many new segments (0: all)."),
    suite_duration_s: float = typer.Option(30.0, "--suite-duration", min=1.0, help="Simulated seconds per held-out vehicle."),
    suite_classes: str = typer.Option("", "--suite-classes", help="Comma-separated scenario classes of the gate (default: all)."),
    base: str = typer.Option("", "--base", help="Registry ref of the current model (default: newest released, else validated)."),
    min_reduction: float = typer.Option(0.0, "--min-reduction", min=0.0, max=0.99,
                                        help="Required fall of suite interventions/hour (0.3 = 30%)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the replay sample and the fine-tune."),
) -> None:
    """Turn the catalog's new segments into a gated candidate model."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from driveloop._cli_fl import _suite  # the one parser of --suite-classes (fl run has the same flag)
    from driveloop.cloud.evaluation import GateTolerances
    from driveloop.cloud.pipeline import PipelineConfig, run_pipeline
    from driveloop.cloud.train import FinetuneConfig
    from driveloop.settings import load_settings

    config = PipelineConfig.from_settings(
        load_settings(),
        base_ref=base or None,
        finetune=FinetuneConfig(epochs=epochs, seed=seed),
        suite=_suite(suite_classes, suite_duration_s),
        tolerances=GateTolerances(min_suite_iph_reduction_frac=min_reduction),
        seed=seed,
        max_segments=max_segments or None,
    )
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True,
                  disable=as_json) as progress:
        tasks: dict[str, Any] = {}

        def on_stage(stage: str, state: str) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=1)
            if state == "done":
                progress.update(tasks[stage], completed=1, description=f"{stage} ✓")

        report = run_pipeline(config, on_stage=on_stage).to_dict()
    if as_json:
        typer.echo(dumps(report))
    else:
        _print_report(report)
