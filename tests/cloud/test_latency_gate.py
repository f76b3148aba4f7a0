"""The latency gate: the pure verdict swept around its thresholds, then real ONNX Runtime measurements of
a model built to be slower (4x the widths) and one built to be faster (the distillation student)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from driveloop.cloud.latency_gate import LatencyGateConfig, judge_latency, measure_interleaved
from driveloop.core.exceptions import ConfigError, PipelineError

CFG = LatencyGateConfig()


def _samples(p50_us: float, p99_us: float, n: int = 1000) -> list[float]:
    """n samples (seconds) whose 50th percentile is exactly p50_us and 99th exactly p99_us."""
    return list(np.concatenate([np.full(n - n // 50, p50_us), np.full(n // 50, p99_us)]) * 1e-6)


# (parent p50, parent p99, variant p50, variant p99) -> expected checks, at both batch sizes.
CASES = {
    "half the time": ((30, 60, 15, 40), {"p50_faster": True, "p99_no_worse": True}),
    "exactly 0.8x p50, equal p99": ((30, 60, 30 * CFG.max_p50_ratio, 60), {"p50_faster": True, "p99_no_worse": True}),
    "just over 0.8x p50": ((30, 60, 30 * CFG.max_p50_ratio * 1.01, 50), {"p50_faster": False, "p99_no_worse": True}),
    "faster p50, worse p99": ((30, 60, 20, 61), {"p50_faster": True, "p99_no_worse": False}),
    "slower (INT8 on a small model)": ((30, 60, 50, 90), {"p50_faster": False, "p99_no_worse": False}),
}


@pytest.mark.parametrize(("times", "checks"), CASES.values(), ids=CASES.keys())
def test_verdict_table(times: tuple[float, float, float, float], checks: dict[str, bool]) -> None:
    pp50, pp99, vp50, vp99 = times
    samples = {b: (_samples(pp50 * b, pp99 * b), _samples(vp50 * b, vp99 * b)) for b in CFG.batches}
    verdict = judge_latency(samples, CFG)
    assert {b: row.checks for b, row in verdict.batches.items()} == {b: checks for b in CFG.batches}
    assert verdict.passed is all(checks.values())
    assert len(verdict.reasons) == len(CFG.batches) * sum(not ok for ok in checks.values())
    assert verdict.ratio(1) == pytest.approx(vp50 / pp50, rel=1e-6)
    assert verdict.as_dict()["batches"]["1"]["p99_ratio"] == pytest.approx(vp99 / pp99, rel=1e-6)


def test_one_slow_batch_size_rejects() -> None:
    samples = {1: (_samples(30, 60), _samples(15, 40)), 8: (_samples(60, 120), _samples(55, 100))}
    verdict = judge_latency(samples, CFG)
    assert verdict.batches[1].checks["p50_faster"] and not verdict.batches[8].checks["p50_faster"]
    assert not verdict.passed and verdict.reasons == [verdict.reasons[0]] and "batch 8" in verdict.reasons[0]


def test_bad_input() -> None:
    with pytest.raises(PipelineError):
        judge_latency({}, CFG)
    with pytest.raises(PipelineError, match="batch 1"):
        judge_latency({1: ([], [1e-5])}, CFG)
    with pytest.raises(ConfigError):
        LatencyGateConfig(max_p50_ratio=0)
    with pytest.raises(ConfigError):
        LatencyGateConfig(fleet_batch=0)
    assert LatencyGateConfig(fleet_batch=1).batches == (1,)


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from driveloop.cloud.export import export_onnx
    from driveloop.cloud.model import PolicyConfig, PolicyNet, StudentNet
    from driveloop.contracts.manifest import build_manifest
    from driveloop.edge.runtime import ModelRuntime

    d = tmp_path_factory.mktemp("latency")
    nets = {
        "parent": PolicyNet(),
        "slower": PolicyNet(PolicyConfig(grid_channels=(32, 64), lidar_channels=(32, 64), grid_features=256,
                                         lidar_features=128, kin_features=256, fused_features=512)),
        "faster": StudentNet(),
    }
    out = {}
    for i, (name, net) in enumerate(nets.items(), start=1):
        path = export_onnx(net, d / f"{name}.onnx")
        out[name] = ModelRuntime(path, build_manifest(path, name=name, version=i), device="cpu")
    return out


def _feeds(batches: tuple[int, ...]) -> dict[int, dict[str, np.ndarray]]:
    from driveloop.cloud.model import example_inputs
    from driveloop.contracts import observation as C

    return {b: {n: t.numpy() for n, t in zip(C.INPUT_NAMES, example_inputs(b, seed=b))} for b in batches}


@pytest.mark.parametrize(("variant", "passes"), [("slower", False), ("faster", True)])
def test_real_measurement(runtimes: dict[str, object], variant: str, passes: bool) -> None:
    """Interleaved ORT timings (one thread, as on the vehicle): 4x widths are rejected, the student passes."""
    cfg = LatencyGateConfig(fleet_batch=8, iters=2000, warmup=50)
    samples = measure_interleaved(runtimes["parent"], runtimes[variant], _feeds(cfg.batches), cfg.iters, cfg.warmup)
    assert {b: (len(p), len(v)) for b, (p, v) in samples.items()} == {1: (2000, 2000), 8: (2000, 2000)}
    verdict = judge_latency(samples, cfg)
    assert verdict.passed is passes, verdict.as_dict()
    for row in verdict.batches.values():
        assert row.checks["p50_faster"] is passes
        assert (row.p50_ratio <= cfg.max_p50_ratio) is passes


def test_measured_in_the_order_it_says(tmp_path: Path) -> None:
    """ABBA: even iterations call the parent first, odd ones the variant first."""
    calls: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, batch: dict[str, np.ndarray]) -> None:
            calls.append(self.name)

    measure_interleaved(Recorder("p"), Recorder("v"), {1: {}}, iters=4, warmup=0)
    assert calls == ["p", "v", "v", "p", "p", "v", "v", "p"]
