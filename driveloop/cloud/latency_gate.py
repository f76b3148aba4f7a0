"""The latency gate of a compressed variant: faster than its fp32 parent, measured in the same run.

A variant (distilled student, INT8 graph) exists only to be cheaper on the vehicle, so it must prove it
where it counts: ONNX Runtime on one CPU thread (``intra_op_num_threads=1``, as ``edge.runtime.
ModelRuntime`` runs every vehicle), at batch 1 (one vehicle) and at the fleet's batch size. Rules:

- p50 of the variant <= ``max_p50_ratio`` (0.8) x the parent's p50, at every batch size;
- p99 of the variant <= ``max_p99_ratio`` (1.0) x the parent's p99 ("no worse"), at every batch size.

Parent and variant are timed in the same process, interleaved call by call (ABBA order), on the same
recorded frames: load that comes and goes on a shared machine lands on both alike instead of on
whichever model happened to run during it. ``judge_latency`` is pure (samples in, verdict out);
``measure_interleaved`` is the adapter that produces the samples.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from driveloop.core.exceptions import ConfigError, PipelineError

logger = logging.getLogger(__name__)

CHECKS = ("p50_faster", "p99_no_worse")


@dataclass(frozen=True)
class LatencyGateConfig:
    max_p50_ratio: float = 0.8
    max_p99_ratio: float = 1.0
    fleet_batch: int = 8  # the demo fleet's size: one batched call per fleet tick
    iters: int = 2000  # timed calls per model and batch size
    warmup: int = 100  # untimed calls per model and batch size first (allocations, caches)

    def __post_init__(self) -> None:
        for name in ("max_p50_ratio", "max_p99_ratio"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"latency gate {name} must be > 0, got {v}")
        if self.fleet_batch < 1 or self.iters < 10 or self.warmup < 0:
            raise ConfigError("latency gate needs fleet_batch >= 1, iters >= 10 and warmup >= 0")

    @property
    def batches(self) -> tuple[int, ...]:
        return (1,) if self.fleet_batch == 1 else (1, self.fleet_batch)


@dataclass(frozen=True)
class BatchLatency:
    """One batch size: both models' p50/p99 (µs), their ratios and the two checks."""

    batch: int
    parent_p50_us: float
    parent_p99_us: float
    variant_p50_us: float
    variant_p99_us: float
    checks: dict[str, bool]

    @property
    def p50_ratio(self) -> float:
        return self.variant_p50_us / self.parent_p50_us

    @property
    def p99_ratio(self) -> float:
        return self.variant_p99_us / self.parent_p99_us

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "parent_p50_us": self.parent_p50_us, "parent_p99_us": self.parent_p99_us,
                "variant_p50_us": self.variant_p50_us, "variant_p99_us": self.variant_p99_us,
                "p50_ratio": self.p50_ratio, "p99_ratio": self.p99_ratio, "checks": dict(self.checks)}


@dataclass(frozen=True)
class LatencyVerdict:
    batches: dict[int, BatchLatency]
    reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(all(b.checks.values()) for b in self.batches.values())

    def ratio(self, batch: int) -> float:
        """The p50 ratio (variant / parent) at ``batch``."""
        return self.batches[batch].p50_ratio

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "batches": {str(n): b.as_dict() for n, b in self.batches.items()},
                "reasons": list(self.reasons)}


def _pct_us(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q) * 1e6)


def judge_latency(samples: Mapping[int, tuple[Sequence[float], Sequence[float]]], config: LatencyGateConfig) -> LatencyVerdict:
    """Verdict from per-batch (parent seconds, variant seconds) samples; PipelineError when one is empty."""
    if not samples:
        raise PipelineError("the latency gate got no measurements")
    out: dict[int, BatchLatency] = {}
    reasons: list[str] = []
    for batch in sorted(samples):
        parent, variant = samples[batch]
        if len(parent) == 0 or len(variant) == 0:
            raise PipelineError(f"the latency gate got no samples at batch {batch}")
        pp50, pp99, vp50, vp99 = (_pct_us(s, q) for s, q in ((parent, 50), (parent, 99), (variant, 50), (variant, 99)))
        checks = {"p50_faster": vp50 <= config.max_p50_ratio * pp50, "p99_no_worse": vp99 <= config.max_p99_ratio * pp99}
        out[batch] = row = BatchLatency(batch, pp50, pp99, vp50, vp99, checks)
        if not checks["p50_faster"]:
            reasons.append(f"batch {batch}: p50 {vp50:.1f} µs is {row.p50_ratio:.2f}x the parent's {pp50:.1f} µs "
                           f"(need <= {config.max_p50_ratio:.2f}x)")
        if not checks["p99_no_worse"]:
            reasons.append(f"batch {batch}: p99 {vp99:.1f} µs is {row.p99_ratio:.2f}x the parent's {pp99:.1f} µs "
                           f"(need <= {config.max_p99_ratio:.2f}x)")
    verdict = LatencyVerdict(out, reasons)
    logger.info("latency gate %s: %s", "PASSED" if verdict.passed else "FAILED",
                ", ".join(f"b{n} p50 x{b.p50_ratio:.2f} p99 x{b.p99_ratio:.2f}" for n, b in out.items()))
    return verdict


def measure_interleaved(
    parent: Any, variant: Any, feeds: Mapping[int, dict[str, np.ndarray]], iters: int, warmup: int
) -> dict[int, tuple[list[float], list[float]]]:
    """Seconds per ``run`` call of two runners (``ModelRunner``) on the same feeds, interleaved ABBA.

    ``feeds`` maps a batch size to a contract batch of that size. Even iterations call the parent
    first, odd ones the variant first, so neither model always runs on a cache the other just warmed.
    """
    out: dict[int, tuple[list[float], list[float]]] = {}
    clock = time.perf_counter
    for batch, feed in feeds.items():
        for _ in range(warmup):
            parent.run(feed)
            variant.run(feed)
        p_s: list[float] = []
        v_s: list[float] = []
        for i in range(iters):
            order = ((parent, p_s), (variant, v_s)) if i % 2 == 0 else ((variant, v_s), (parent, p_s))
            for runner, dest in order:
                t0 = clock()
                runner.run(feed)
                dest.append(clock() - t0)
        out[batch] = (p_s, v_s)
    return out
