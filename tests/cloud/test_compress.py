"""Compressed variants through the gates, on real recorded segments, real training, real ONNX Runtime.

The fixture: v1 (root) and v2 (its child, both validated) are freshly initialised policies, whose small
head makes them "hold speed, go straight" drivers; v2's recorded drive through a cut-in, a braking lead
and a highway (real fleet runner + recorder) fills a real catalog and object store, so there are frames with
safety events. v2's gate suite is 4 s of highway with one held-out vehicle: with no traffic event in it,
a cruise policy and its student both drive it without an intervention, so the distilled student's
closed-loop gate is known to pass, and its latency gate too (a student is built with a third of the nodes).
INT8 on this small model is slower on a CPU (per-call quantize/dequantize work), so it is rejected.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from driveloop.cloud.compress import BUILDERS, CompressConfig, compress, onnx_param_count
from driveloop.cloud.compress_frames import Frames, empty_frames, select_calibration
from driveloop.cloud.evaluation import EvalSuite
from driveloop.cloud.latency_gate import LatencyGateConfig
from driveloop.cloud.quantize import Int8Config, describe_qdq, pick_excluded, quantize_int8
from driveloop.contracts.manifest import VARIANT_METHODS
from driveloop.core.exceptions import ConfigError, PipelineError, RegistryError

pytestmark = pytest.mark.slow

SUITE = EvalSuite(classes={"highway": ("highway",)}, vehicles_per_scenario=1, duration_s=4.0)
DRIVE = ("cut-in", "ccrb-12-6", "highway")
LATENCY = LatencyGateConfig(iters=1000, warmup=50)


def _drive_and_ingest(home: Path, art: object) -> None:
    """A real recorded drive, ingested as the ingest server does (validate, store by sha256, catalog)."""
    from driveloop.cloud.catalog import Catalog, SegmentRecord
    from driveloop.cloud.store import ObjectStore
    from driveloop.contracts.segment import validate_segment
    from driveloop.edge.fleet import InProcessInference, VehiclePlan, run_fleet
    from driveloop.edge.recorder import Recorder
    from driveloop.edge.runtime import ModelRuntime
    from driveloop.edge.spool import Spool

    spool = Spool(home / "spool", 10**9)
    runtime = ModelRuntime(art.onnx_path, art.manifest, device="cpu")  # type: ignore[attr-defined]
    plans = [VehiclePlan(f"veh-{i}", name, 100 + i) for i, name in enumerate(DRIVE)]
    report = run_fleet(plans, {"default": InProcessInference(runtime)}, duration_s=20.0,
                       recorder_factory=lambda vid, sc, seed: Recorder(spool, vid, sc, seed, model_version="2"))
    (home / "cloud").mkdir(exist_ok=True)
    catalog, store = Catalog(f"sqlite:///{home / 'cloud' / 'catalog.db'}"), ObjectStore(home / "cloud" / "store")
    for path in report.segments:
        store.put_file(path)
        catalog.add_segment(SegmentRecord.from_info(validate_segment(path), time.time()))
    catalog.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from driveloop.cloud.export import export_onnx
    from driveloop.cloud.model import PolicyConfig, PolicyNet
    from driveloop.cloud.registry import Registry

    home = tmp_path_factory.mktemp("compress_home")
    with Registry(home / "registry") as reg:
        reg.register(export_onnx(PolicyNet(), home / "v1.onnx"))
        reg.set_stage(1, "validated", "fixture root")
        reg.register(export_onnx(PolicyNet(PolicyConfig(seed=1)), home / "v2.onnx"), parent_version=1,
                     lineage={"eval_suite": SUITE.to_dict()})
        reg.set_stage(2, "validated", "fixture child")
        reg.register(export_onnx(PolicyNet(PolicyConfig(seed=2)), home / "v3.onnx"), parent_version=1)
        reg.set_stage(3, "rejected", "fixture: failed its gate")
        art = reg.get(2)
    _drive_and_ingest(home, art)
    return home


def _config(home: Path, **kw: object) -> CompressConfig:
    return CompressConfig(home=home, catalog_url=f"sqlite:///{home / 'cloud' / 'catalog.db'}",
                          store_url=str(home / "cloud" / "store"), registry_dir=home / "registry", latency=LATENCY, **kw)


def test_one_list_of_methods() -> None:
    assert tuple(BUILDERS) == VARIANT_METHODS


def test_distilled_student_passes_both_gates(home: Path) -> None:
    from driveloop.cloud.checkpoints import load_weights
    from driveloop.cloud.export import check_parity
    from driveloop.cloud.model import StudentNet
    from driveloop.cloud.registry import Registry

    r = compress(_config(home), "v2", "distill")
    assert (r.method, r.parent, r.stage) == ("distill", 2, "validated"), r.gate["reasons"]
    assert r.params * 3 <= r.parent_params == 74355 and r.size_bytes < r.parent_size_bytes
    assert r.latency_ratio_b1 <= 0.8 and r.latency_ratio_fleet <= 0.8 and r.gate["passed"]
    assert r.gate["baseline_version"] == 1  # the bar v2 itself cleared
    assert r.frames["catalog"]["event_frames"] > 0 and r.build["distill"]["event_frames"] == r.frames["catalog"]["event_frames"]
    assert r.build["parity_max_abs"] <= 1e-4
    with Registry(home / "registry") as reg:
        art = reg.get(r.variant)
        assert art.stage == "validated"
        assert art.manifest.variant is not None and (art.manifest.variant.method, art.manifest.variant.parent) == ("distill", 2)
        assert [m.version for m in reg.lineage(r.variant)] == [r.variant, 2, 1]
        assert [v.version for v in reg.variants(2)] == [r.variant]
        assert art.manifest.metrics["latency_ratio_b1"] == r.latency_ratio_b1
        student = StudentNet()
        student.load_state_dict(load_weights(home / "registry", art.manifest))  # the student's weights are kept
        assert onnx_param_count(art.onnx_path) == student.count_params() == r.params
        assert check_parity(student, art.onnx_path) <= 1e-4  # ... and they are the registered graph's


def test_int8_is_qdq_per_channel_calibrated_on_events_and_rejected_as_slower(home: Path) -> None:
    from driveloop.cloud.registry import Registry

    r = compress(_config(home), 2, "int8")
    assert (r.method, r.parent, r.stage, r.gate["passed"]) == ("int8", 2, "rejected", False)
    assert r.latency_ratio_b1 > 1.0 and r.gate["latency"]["batches"]["1"]["checks"]["p50_faster"] is False
    assert any(reason.startswith("latency: batch 1: p50") for reason in r.gate["reasons"])
    assert r.params == r.parent_params and r.size_bytes < r.parent_size_bytes  # int8 weights: smaller file
    calib, events = r.build["calibration"], r.frames["catalog"]["event_frames"]
    assert calib["frames"] == Int8Config().calibration_frames
    assert calib["event_frames"] == min(events, math.ceil(calib["frames"] * Int8Config().event_share)) > 0
    with Registry(home / "registry") as reg:
        art = reg.get(r.variant)
        assert art.stage == "rejected" and "latency" in reg.history(r.variant)[-1].reason
        assert art.manifest.variant is not None and art.manifest.variant.method == "int8"
        qdq = describe_qdq(art.onnx_path)
    assert qdq["quantize_linear"] > 0 and qdq["dequantize_linear"] > 0
    assert len(qdq["weights"]) == 11 - len(r.build["int8"]["excluded_nodes"])  # every Conv/Gemm weight but the excluded
    for name, w in qdq["weights"].items():  # per-channel: one scale per output channel, on axis 0
        assert w["axis"] == 0 and w["scales"] == w["channels"] > 1, name


def test_excluded_nodes_are_the_worst(home: Path, tmp_path: Path) -> None:
    from driveloop.cloud.compress_frames import catalog_frames
    from driveloop.cloud.registry import Registry

    with Registry(home / "registry") as reg:
        parent = reg.get(2).onnx_path
    frames, _ = catalog_frames(f"sqlite:///{home / 'cloud' / 'catalog.db'}", str(home / "cloud" / "store"), tmp_path, 8)
    calib = frames.take(select_calibration(frames, 256, 0.25, 0))
    cfg = Int8Config(max_node_rel_error=0.0, max_excluded=2)
    report = quantize_int8(parent, tmp_path / "q.onnx", calib, cfg, tmp_path / "work")
    errors = {n: e["rel_error"] for n, e in report["node_errors"].items()}
    assert len(errors) == 11 and all(e > 0 for e in errors.values())
    worst = sorted(errors, key=errors.get, reverse=True)[:2]  # type: ignore[arg-type]
    assert report["excluded_nodes"] == worst
    assert sorted(report["qdq"]["float_nodes"]) == sorted(worst)  # their weights stayed float32
    assert report["action_error"] < 0.05


EXCLUDE_CASES = {
    "none over the limit": ({"a": 0.01, "b": 0.02}, 0.05, 3, []),
    "worst first": ({"a": 0.06, "b": 0.2, "c": 0.01}, 0.05, 3, ["b", "a"]),
    "capped": ({"a": 0.06, "b": 0.2, "c": 0.1}, 0.05, 2, ["b", "c"]),
    "at the limit stays quantized": ({"a": 0.05}, 0.05, 3, []),
    "non-finite is the worst": ({"a": 0.9, "b": math.inf, "c": math.nan}, 0.05, 2, ["b", "c"]),
    "ties by name": ({"b": 0.1, "a": 0.1}, 0.05, 1, ["a"]),
    "nothing excluded when capped at 0": ({"a": 1.0}, 0.05, 0, []),
}


@pytest.mark.parametrize(("errors", "limit", "cap", "want"), EXCLUDE_CASES.values(), ids=EXCLUDE_CASES.keys())
def test_pick_excluded(errors: dict[str, float], limit: float, cap: int, want: list[str]) -> None:
    assert pick_excluded(errors, limit, cap) == want


def _frames(n: int, events: list[int]) -> Frames:
    """``n`` blank frames, the ones at ``events`` flagged as safety events."""
    f = empty_frames()
    return Frames(*(np.zeros((n, *a.shape[1:]), a.dtype) for a in (f.kinematics, f.lidar, f.grid)),
                  np.isin(np.arange(n), events), np.zeros(n, bool))


def test_select_calibration() -> None:
    frames = _frames(1000, [5, 500, 900])
    idx = select_calibration(frames, 100, 0.25, seed=1)
    assert len(idx) == 100 == len(set(idx.tolist())) and {5, 500, 900} <= set(idx.tolist())
    assert np.array_equal(idx, select_calibration(frames, 100, 0.25, seed=1))  # seeded
    many = _frames(1000, list(range(0, 1000, 2)))  # 500 event frames: at most a quarter of the set
    assert int(many.event[select_calibration(many, 100, 0.25, seed=0)].sum()) >= 25
    assert np.array_equal(select_calibration(_frames(10, [3]), 100, 0.25, 0), np.arange(10))
    with pytest.raises(PipelineError, match="safety event"):
        select_calibration(_frames(50, []), 10, 0.25, 0)
    with pytest.raises(ConfigError):
        select_calibration(frames, 0, 0.25, 0)


def test_refusals(home: Path, tmp_path: Path) -> None:
    from driveloop.cloud.export import export_onnx
    from driveloop.cloud.model import StudentNet
    from driveloop.cloud.registry import Registry

    with pytest.raises(RegistryError, match="rejected"):
        compress(_config(home), 3, "distill")
    with pytest.raises(ConfigError, match="unknown compression method"):
        compress(_config(home), 2, "fp16")
    with pytest.raises(RegistryError, match="not in the registry"):
        compress(_config(home), 99, "int8")
    with pytest.raises(RegistryError, match="no model registry"):
        compress(_config(tmp_path), 1, "int8")
    path = export_onnx(StudentNet(), tmp_path / "s.onnx")
    with Registry(home / "registry") as reg:
        with pytest.raises(RegistryError, match="must be its parent_version"):
            reg.register(path, parent_version=1, variant={"method": "distill", "parent": 2})
        child = reg.register(path, parent_version=2, variant={"method": "distill", "parent": 2})
        with pytest.raises(RegistryError, match="itself a compressed variant"):
            reg.register(path, parent_version=child.version, variant={"method": "int8", "parent": child.version})
        reg.set_stage(child.version, "rejected", "test: not gated")
    with pytest.raises(RegistryError, match="itself a distill variant"):
        compress(_config(home), child.version, "int8")


def test_cli_json_and_errors(home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from driveloop.cli import main

    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    assert main(["models", "compress", "2", "--method", "int8", "--json", "--iters", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"variant", "parent", "params", "size_bytes", "latency_ratio_b1", "latency_ratio_fleet", "gate"} <= set(out)
    assert out["parent"] == 2 and out["method"] == "int8" and out["stage"] == "rejected"
    assert out["gate"]["passed"] is False and {"passed", "latency", "closed_loop", "reasons"} <= set(out["gate"])
    assert set(out["gate"]["latency"]["batches"]) == {"1", "8"} and out["fleet_batch"] == 8
    for args, code, text in ((["models", "compress", "77", "--method", "int8"], 4, "not in the registry"),
                             (["models", "compress", "2", "--method", "fp16"], 2, "unknown compression method"),
                             (["models", "compress", "3", "--method", "distill"], 4, "only a validated or released")):
        assert main(args) == code
        err = capsys.readouterr().err
        assert err.startswith("driveloop: error: ") and err.count("\n") == 1 and text in err, err
