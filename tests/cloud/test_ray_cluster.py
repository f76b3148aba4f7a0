"""A real two-node Ray cluster on this machine: a head node and a second node, 1 CPU each, each with its own
raylet, object store and workers (``ray.cluster_utils.Cluster`` starts the same processes ``ray start``
does, and its ``shutdown`` stops only those — never every Ray on the machine, as ``ray stop`` would).

With ``RAY_ADDRESS`` set to it, ``driveloop safety-suite --fallback-only --json`` and ``driveloop cloud
pipeline run`` (gate included) run as separate driver processes across both nodes: every case, and the
gate's episodes, name the node they ran on, and both nodes appear. Their results equal the in-process ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.serve import driveloop_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, set[str]]]:
    """(address, node ids) of a 2-node, 2-CPU Ray cluster on this machine, started and stopped here.

    The nodes take the machine's own address (Ray's default), not 127.0.0.1: a driver joining by
    ``RAY_ADDRESS`` reaches the cluster at the node address Ray resolves for it."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c.address, {n.node_id for n in c.list_all_nodes()}
    finally:
        c.shutdown()


def _driveloop(args: list[str], home: Path, address: str | None = None, timeout_s: float = 1800) -> dict[str, Any]:
    """Run the CLI as its own process (a Ray driver of its own when ``address`` is given); its JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DRIVELOOP_SIM_BACKEND")}
    env.update(DRIVELOOP_HOME=str(home), RAY_USAGE_STATS_ENABLED="0", **({"RAY_ADDRESS": address} if address else {}))
    done = subprocess.run([*driveloop_command(), *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_safety_suite_fallback_only_across_two_nodes(cluster: tuple[str, set[str]], tmp_path: Path) -> None:
    from driveloop._cli_safety import family_cases, run_suite

    address, nodes = cluster
    r = _driveloop(["safety-suite", "--fallback-only", "--json"], tmp_path, address)
    assert (r["cases"], r["avoided"], r["avoidable_collisions"]) == (30, 30, 0)
    assert r["execution"]["backend"] == "ray" and r["execution"]["nodes"] == 2
    assert {row["node"] for row in r["rows"]} == nodes == set(r["execution"]["node_ids"])  # work on both nodes
    local = run_suite({}, fallback_only=True, noise=0.0, cases=family_cases("ccr"), nominal=0, nominal_duration_s=1.0)
    assert [{k: v for k, v in row.items() if k != "node"} for row in r["rows"]] == \
        [{k: v for k, v in row.items() if k != "node"} for row in local["rows"]]


# The pipeline's input: two vehicles' CCRs drives with the random-weight model v1 (the fallback steps in).
DRIVES = (("ccrs-30", 11), ("ccrs-60", 13))


def test_pipeline_run_with_its_gate_across_two_nodes(cluster: tuple[str, set[str]], random_home: Path,
                                                      tmp_path: Path) -> None:
    """Ray Data, Ray Train and the gate's episodes on the cluster; the gate's metrics of base and candidate
    equal an in-process evaluation of the same two models on the same suite."""
    from driveloop.cloud.evaluation import ClassMetrics, EvalSuite, evaluate_model
    from driveloop.cloud.registry import Registry

    address, nodes = cluster
    home = tmp_path / "home"
    shutil.copytree(random_home, home)
    for scenario, seed in DRIVES:
        drove = _driveloop(["drive", "--scenario", scenario, "--vehicles", "2", "--duration", "10", "--seed",
                            str(seed), "--model", "1", "--json"], home)
        assert drove["segments"] > 0 and drove["upload"]["uploaded"] == drove["segments"]
    r = _driveloop(["cloud", "pipeline", "run", "--json", "--epochs", "1", "--suite-classes", "ccrs",
                    "--suite-duration", "8"], home, address)
    assert r["status"] == "ok" and r["candidate"] == 2 and r["candidate_stage"] in ("validated", "rejected")
    ex = r["execution"]
    assert ex["backend"] == "ray" and ex["nodes"] == 2 and set(ex["node_ids"]) == nodes
    assert ex["units"] == 2 * 3  # base and candidate, one unit per CCRs scenario

    suite = EvalSuite(classes={"ccrs": ("ccrs-30", "ccrs-50", "ccrs-70")}, duration_s=8.0)
    with Registry(home / "registry") as reg:
        base, cand = reg.get(1), reg.get(2)
    gate = r["gate"]["classes"]["ccrs"]
    for art, which in ((base, "baseline"), (cand, "candidate")):
        local: ClassMetrics = evaluate_model(art.onnx_path, art.manifest, suite)["ccrs"]
        assert gate[which] == pytest.approx(local.as_dict(), rel=0, abs=0), which
