"""The whole loop over real recorded segments: Ray Data + Ray Train + export + closed-loop gate + registry.

One real short drive (fleet runner + recorder) feeds a real catalog and object store; a truncated copy
of one segment plays the corrupt upload. Tiny settings keep it to a couple of minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from driveloop.cloud.evaluation import EvalSuite, GateTolerances
from driveloop.cloud.mining import MiningConfig
from driveloop.cloud.pipeline import PipelineConfig, PipelineReport, run_pipeline
from driveloop.cloud.train import FinetuneConfig
from driveloop.core.exceptions import PipelineError

pytestmark = pytest.mark.slow

SCENARIOS = ("cut-in", "ccrb-12-6", "dense")


def _record_drive(root: Path, model_path: Path, manifest: object) -> list[Path]:
    from driveloop.edge.fleet import InProcessInference, VehiclePlan, run_fleet
    from driveloop.edge.recorder import Recorder
    from driveloop.edge.runtime import ModelRuntime
    from driveloop.edge.spool import Spool

    spool = Spool(root / "spool", 10**9)
    plans = [VehiclePlan(f"v{i}", s, 100 + i) for i, s in enumerate(SCENARIOS)]
    client = InProcessInference(ModelRuntime(model_path, manifest, device="cpu"))  # type: ignore[arg-type]
    report = run_fleet(plans, {"default": client}, duration_s=25.0,
                       recorder_factory=lambda vid, sc, seed: Recorder(spool, vid, sc, seed, model_version="1"))
    return list(report.segments)


def _ingest(catalog: object, store: object, path: Path) -> str:
    """What the ingest server does after an upload: validate, store by sha256, catalog."""
    from driveloop.cloud.catalog import SegmentRecord
    from driveloop.contracts.segment import validate_segment

    info = validate_segment(path)
    sha = store.put_file(path)  # type: ignore[attr-defined]
    catalog.add_segment(SegmentRecord.from_info(info, time.time()))  # type: ignore[attr-defined]
    return sha


@pytest.fixture(scope="module")
def loop_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from driveloop.cloud.catalog import Catalog, SegmentRecord
    from driveloop.cloud.checkpoints import save_weights
    from driveloop.cloud.export import export_onnx
    from driveloop.cloud.model import PolicyNet
    from driveloop.cloud.registry import Registry
    from driveloop.cloud.store import ObjectStore
    from driveloop.contracts.segment import validate_segment

    home = tmp_path_factory.mktemp("home")
    registry_dir = home / "registry"
    net = PolicyNet()
    with Registry(registry_dir) as reg:
        base = reg.register(export_onnx(net, home / "base.onnx"))
        reg.set_stage(base.version, "validated", "test base model")
    save_weights(registry_dir, base.sha256, net.state_dict())
    segments = _record_drive(home, registry_dir / "blobs" / f"{base.sha256}.onnx", base)
    catalog_url = f"sqlite:///{home / 'catalog.db'}"
    store = ObjectStore(home / "store")
    catalog = Catalog(catalog_url)
    good = [_ingest(catalog, store, p) for p in segments]
    # a segment that went bad in the store: truncated bytes under a catalog record
    broken = home / "broken.mcap"
    broken.write_bytes(segments[0].read_bytes()[:-200])
    bad_sha = store.put_file(broken)
    info = validate_segment(segments[0])
    catalog.add_segment(dataclasses.replace(SegmentRecord.from_info(info, time.time()), sha256=bad_sha))
    catalog.close()
    config = PipelineConfig(
        home=home, catalog_url=catalog_url, store_url=str(home / "store"), registry_dir=registry_dir,
        mining=MiningConfig(top_k=400), finetune=FinetuneConfig(epochs=1, batch_size=64),
        suite=EvalSuite(classes={"cut-in": ("cut-in",), "ccrb": ("ccrb-12-6",)}, duration_s=6.0),
        tolerances=GateTolerances(),
    )
    report = run_pipeline(config)
    return {"config": config, "report": report, "good": good, "bad": bad_sha, "base": base.version}


def test_report_has_every_part_and_skips_the_corrupt_segment(loop_home: dict) -> None:
    r: PipelineReport = loop_home["report"]
    assert r.status == "ok"
    assert r.segments_new == len(loop_home["good"]) + 1
    assert r.segments_used == len(loop_home["good"])
    assert [x["sha256"] for x in r.rejected] == [loop_home["bad"]]
    assert r.dataset_version and r.dataset_version.startswith("ds-")
    assert r.samples == r.hard_samples + r.replay_samples > 0
    assert 0 < r.hard_samples <= 400
    assert r.labeler["nominal_frames"] > 0 and r.labeler["event_frames"] > 0
    assert r.parity_max_abs is not None and r.parity_max_abs <= 1e-4
    assert r.training["hard_loss_after"] < r.training["hard_loss_before"]
    for side in ("baseline", "candidate"):
        assert {"interventions_per_hour", "collisions", "progress"} <= set(r.gate[side])
    assert set(r.gate["classes"]) == {"cut-in", "ccrb"}
    assert r.candidate_stage == ("validated" if r.gate["passed"] else "rejected")
    for stage in ("discover", "validate", "dataset", "train", "export", "evaluate", "register"):
        assert r.timings_s[stage] >= 0
    json.dumps(r.to_dict())


def test_candidate_is_registered_with_lineage_and_weights(loop_home: dict) -> None:
    from driveloop.cloud.checkpoints import load_weights
    from driveloop.cloud.registry import Registry

    r: PipelineReport = loop_home["report"]
    cfg: PipelineConfig = loop_home["config"]
    with Registry(cfg.registry_dir) as reg:
        art = reg.get(r.candidate)
        assert art.stage == r.candidate_stage
        m = art.manifest
        assert m.parent_version == loop_home["base"]
        assert m.dataset_version == r.dataset_version
        assert m.metrics["gate"]["passed"] == r.gate["passed"]
        assert m.training_run["run_id"] and m.lineage["dataset_digest"].startswith(r.dataset_version[3:])
        weights = load_weights(cfg.registry_dir, m)
        assert set(weights) == set(load_weights(cfg.registry_dir, reg.get(loop_home["base"]).manifest))


def test_consumed_segments_are_marked_and_a_rerun_skips_them(loop_home: dict) -> None:
    from driveloop.cloud.catalog import Catalog

    cfg: PipelineConfig = loop_home["config"]
    cat = Catalog(cfg.catalog_url)
    try:
        assert [s.sha256 for s in cat.new_segments()] == [loop_home["bad"]]
        assert {cat.get_segment(s).consumed_by_dataset for s in loop_home["good"]} == {loop_home["report"].dataset_version}
    finally:
        cat.close()
    # only the corrupt one is left: a clear error, and no partial dataset version behind it
    with pytest.raises(PipelineError, match="none of the 1 new segments is valid"):
        run_pipeline(cfg)
    datasets = cfg.home / "cloud" / "datasets"
    names = [p.name for p in datasets.iterdir()]
    assert len(names) == 1 and names[0].startswith(loop_home["report"].dataset_version[3:])


def test_rerun_on_unchanged_input_reuses_dataset_and_training(loop_home: dict, tmp_path: Path) -> None:
    from driveloop.cloud.catalog import Catalog
    cfg: PipelineConfig = loop_home["config"]
    r: PipelineReport = loop_home["report"]
    # the same segments in a fresh catalog: same dataset digest, so nothing is mined or trained again
    old = Catalog(cfg.catalog_url)
    records = [old.get_segment(s) for s in loop_home["good"]]
    old.close()
    url = f"sqlite:///{tmp_path / 'catalog2.db'}"
    fresh = Catalog(url)
    for rec in records:
        fresh.add_segment(dataclasses.replace(rec, consumed_by_dataset=None))
    fresh.close()
    again = run_pipeline(dataclasses.replace(cfg, catalog_url=url))
    assert again.dataset_reused and again.dataset_version == r.dataset_version
    assert again.training["run_id"] == r.training["run_id"]
    assert "dataset.mine+label" in r.timings_s and "dataset.mine+label" not in again.timings_s
    assert again.gate["candidate"] == r.gate["candidate"]  # same candidate bytes -> cached evaluation


def test_local_build_matches_the_ray_build(loop_home: dict) -> None:
    """A vehicle (federated mode) builds the same arrays from its own segments without Ray."""
    import numpy as np

    from driveloop.cloud._dataset_build import build_arrays_local, build_arrays_with_ray
    from driveloop.cloud.ray_runtime import ensure_ray
    from driveloop.cloud.labeling import LabelerConfig
    from driveloop.cloud.store import ObjectStore
    from driveloop.contracts.segment import validate_segment

    cfg: PipelineConfig = loop_home["config"]
    store = ObjectStore(cfg.store_url)
    segs = [(Path(store.url_of(sha)), sha, validate_segment(store.url_of(sha)).meta.scenario) for sha in loop_home["good"][:3]]
    ensure_ray(None, 2)
    ray_arrays, ray_stats = build_arrays_with_ray(segs, cfg.mining, LabelerConfig(), 0, 1)
    local_arrays, local_stats = build_arrays_local(segs, cfg.mining, LabelerConfig(), 0)
    assert set(ray_arrays) == set(local_arrays)
    for k in ray_arrays:
        assert np.array_equal(ray_arrays[k], local_arrays[k]), k
    assert ray_stats["labeler"] == pytest.approx(local_stats["labeler"], rel=1e-12, nan_ok=True)  # summation order
    assert ray_stats["hard"] == local_stats["hard"] and ray_stats["replay"] == local_stats["replay"]
