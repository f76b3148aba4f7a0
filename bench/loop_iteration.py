"""One loop iteration, end to end, through the real CLI (issue 5, acceptance 1): a benchmark, not a test.

    bootstrap (behaviour cloning -> model v1)
    -> driveloop drive --scenario mix --vehicles N --duration S   (records MCAP, uploads to the local cloud)
    -> driveloop cloud pipeline run --json --min-reduction 0.3   (mine, label, fine-tune, gate, register)

Prints each step's wall time, the held-out gate (current vs candidate) and the acceptance checks:
interventions/hour >= 30% lower, zero collisions, progress within 5%, whole iteration <= 15 min.
Ratios come from one run on the same machine, so they compare like with like.

    python bench/loop_iteration.py [--home DIR] [--vehicles 8] [--duration 300] [--epochs 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_REDUCTION = 0.30
PROGRESS_TOLERANCE = 0.05
ITERATION_LIMIT_S = 15 * 60


def _cli(home: Path, *args: str) -> tuple[dict[str, Any], float]:
    """Run ``driveloop ARGS --json`` in a child process with DRIVELOOP_HOME=home; (parsed JSON, seconds)."""
    env = {**os.environ, "DRIVELOOP_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from driveloop.cli import main; main()", *args, "--json"],
                          env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"`driveloop {' '.join(args)}` failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), seconds


def _ingest_spool(home: Path) -> int:
    """Fallback when no uploader is wired into `drive`: validate + store + catalog the spool's segments."""
    from driveloop.cloud.catalog import Catalog, SegmentRecord
    from driveloop.cloud.store import ObjectStore
    from driveloop.contracts.segment import scan_directory
    from driveloop.settings import Settings

    settings = Settings(home=home)
    store, catalog = ObjectStore(settings.resolved_store_url()), Catalog(settings.resolved_catalog_url())
    try:
        scan = scan_directory(settings.spool_dir / "closed")
        for info in scan.valid:
            store.put_file(info.path, info.sha256)
            catalog.add_segment(SegmentRecord.from_info(info, time.time()))
        return len(scan.valid)
    finally:
        catalog.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=None, help="Data directory (default: a fresh temp dir).")
    ap.add_argument("--vehicles", type=int, default=8)
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--suite-duration", type=float, default=30.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    home = (args.home or Path(tempfile.mkdtemp(prefix="driveloop-bench-"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    (home / "cloud").mkdir(exist_ok=True)

    steps: dict[str, float] = {}
    boot, steps["bootstrap_s"] = _cli(home, "bootstrap")
    drive, steps["drive_s"] = _cli(home, "drive", "--scenario", "mix", "--vehicles", str(args.vehicles),
                                   "--duration", str(args.duration), "--seed", "0")
    upload = drive.get("upload", {})
    t0 = time.perf_counter()
    direct = 0
    if not isinstance(upload, dict) or upload.get("skipped") or not upload:
        direct = _ingest_spool(home)
    steps["ingest_s"] = time.perf_counter() - t0
    pipe, steps["pipeline_s"] = _cli(home, "cloud", "pipeline", "run", "--min-reduction", str(TARGET_REDUCTION),
                                     "--epochs", str(args.epochs), "--suite-duration", str(args.suite_duration))
    total = sum(steps.values())
    loop_s = total - steps["bootstrap_s"]  # the iteration itself: drive + upload + pipeline
    gate = pipe.get("gate", {})
    base, cand = gate.get("baseline", {}), gate.get("candidate", {})
    b_iph, c_iph = base.get("interventions_per_hour", 0.0), cand.get("interventions_per_hour", 0.0)
    reduction = (b_iph - c_iph) / b_iph if b_iph else 0.0
    progress_ratio = cand.get("progress", 0.0) / base["progress"] if base.get("progress") else 0.0
    result = {
        "home": str(home),
        "machine": f"{os.cpu_count()} CPUs, no GPU" ,
        "bootstrap_version": boot.get("version"),
        "fleet": {k: drive.get(k) for k in ("vehicles", "driven_s", "distance_km", "collisions", "interventions",
                                             "interventions_per_hour", "segments")},
        "ingest": "direct (no uploader)" if direct else "uploaded",
        "pipeline": {k: pipe.get(k) for k in ("dataset_version", "samples", "hard_samples", "replay_samples",
                                              "candidate", "candidate_stage", "labeler", "timings_s", "parity_max_abs")},
        "gate": {"baseline": base, "candidate": cand, "passed": gate.get("passed"),
                 "classes": {k: {"passed": v["passed"], "iph": [v["baseline"]["interventions_per_hour"],
                                                                 v["candidate"]["interventions_per_hour"]]}
                             for k, v in gate.get("classes", {}).items()}},
        "steps_s": {k: round(v, 1) for k, v in steps.items()},
        "iteration_s": round(loop_s, 1),
        "acceptance": {
            "iph_reduction": round(reduction, 3),
            "iph_reduction_ok": reduction >= TARGET_REDUCTION,
            "zero_collisions": cand.get("collisions") == 0,
            "progress_ratio": round(progress_ratio, 4),
            "progress_ok": progress_ratio >= 1 - PROGRESS_TOLERANCE,
            "validated": pipe.get("candidate_stage") == "validated",
            "iteration_within_15_min": loop_s <= ITERATION_LIMIT_S,
        },
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
