"""Server-side optimisation over a round's aggregated update (FedAdam: Reddi et al., ICLR 2021).

Why the server, not the vehicles, holds the optimiser: the fleet's data are non-IID by construction (each
vehicle drives its own scenario mix, so each holds a different share of hazards). Measured on 10 vehicles
(docs/BENCHMARKS.md, issue 6): when every vehicle runs a few local Adam epochs and the server averages the
models (FedAvg), the vehicles with many hazard frames pull the average toward braking early, and the
candidate fails the gate (lead braking at 2 m/s²: progress 0.407 → 0.336), while the same data trained
centrally pass. More local steps made it worse; FedProx did not help. With **one** local full-batch
gradient step per round (FedSGD) the example-weighted mean of the updates *is* the gradient on the union of
the vehicles' data, and Adam applied to that mean on the server is the central optimiser on that union:
100 rounds reach the central fine-tune's held-out interventions/h and pass the gate. Raw data still never
leave a vehicle; only the update does, as in FedAvg.

The aggregation rule (mean, median, trimmed mean, Krum, DP noise) stays the Flower strategy's job; this
step runs after it, on Δ = aggregated − global, read as a negative pseudo-gradient. ``kind="none"`` makes
the aggregate the new global model (plain FedAvg). The state (step count and moments) is part of the
server's checkpoint, so a restarted server continues the same trajectory. Pure numpy, no Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from driveloop.core.exceptions import ConfigError

Arrays = Mapping[str, np.ndarray]
KINDS = ("adam", "none")


@dataclass(frozen=True)
class ServerOptConfig:
    kind: str = "adam"
    lr: float = 3e-4  # Adam: the step of each weight per round, whatever the update's scale
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown server optimizer {self.kind!r}; valid: {', '.join(KINDS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"server lr must be > 0, got {self.lr}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0 and self.eps > 0):
            raise ConfigError("server betas must be in [0, 1) and eps > 0")


@dataclass
class ServerOptState:
    """Adam's step count and first/second moments per tensor (float64; empty before the first step)."""

    step: int = 0
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat ``m/<name>``, ``v/<name>`` arrays (for the checkpoint)."""
        return {**{f"m/{k}": a for k, a in self.m.items()}, **{f"v/{k}": a for k, a in self.v.items()}}

    @classmethod
    def from_arrays(cls, step: int, arrays: Arrays) -> ServerOptState:
        m = {k[2:]: np.asarray(a) for k, a in arrays.items() if k.startswith("m/")}
        v = {k[2:]: np.asarray(a) for k, a in arrays.items() if k.startswith("v/")}
        return cls(step, m, v)


def server_step(current: Arrays, aggregated: Arrays, state: ServerOptState,
                config: ServerOptConfig) -> tuple[dict[str, np.ndarray], ServerOptState]:
    """The next global model from the current one and the round's aggregate; (arrays, new state).

    Adam with bias correction (Kingma & Ba 2015, Algorithm 1) on Δ = aggregated − current. Dtypes of
    ``current`` are kept. The inputs are not modified.
    """
    if config.kind == "none":
        return {k: np.asarray(aggregated[k]).astype(current[k].dtype) for k in current}, state
    t = state.step + 1
    out: dict[str, np.ndarray] = {}
    m: dict[str, np.ndarray] = {}
    v: dict[str, np.ndarray] = {}
    c1, c2 = 1.0 - config.beta1**t, 1.0 - config.beta2**t
    for k, w in current.items():
        delta = np.asarray(aggregated[k], dtype=np.float64) - w
        m[k] = config.beta1 * state.m.get(k, 0.0) + (1.0 - config.beta1) * delta
        v[k] = config.beta2 * state.v.get(k, 0.0) + (1.0 - config.beta2) * delta**2
        step = config.lr * (m[k] / c1) / (np.sqrt(v[k] / c2) + config.eps)
        out[k] = (w + step).astype(w.dtype)
    return out, ServerOptState(t, m, v)
