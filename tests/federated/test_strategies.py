"""Every strategy of ``server.STRATEGY_BUILDERS`` aggregating known updates, through the server's own round
loop (``run_rounds`` over an in-memory grid: screening, the Flower strategy, ``server_opt="none"`` so the
new global model *is* the aggregate), with and without a poisoned minority.

The bounds each robust strategy must keep, and why (n = 10 vehicles, f = 2 poisoned, equal weights):

| strategy | bound on aggregate − honest mean | why |
|---|---|---|
| trimmedavg (β 0.2) | L∞ ≤ the honest updates' per-coordinate spread | f ≤ ⌊βn⌋: at most f values per coordinate lie outside the honest range, so after cutting ⌊βn⌋ from each end every value left lies inside it |
| fedmedian | L∞ ≤ the same spread | f < n/2: the middle value of a coordinate has honest values on both sides |
| krum (f = 2) | L2 ≤ the honest updates' spread (largest distance to their mean) | n > 2f + 2 and the separation below: an honest update scores at most (n−f−2)·h², h the largest honest pairwise distance; a poisoned one at least (n−2f−1)·D², D its distance to the nearest honest update, so Krum selects an honest update |
| fedavg, fedprox | exactly (f/n)·(poisoned mean − honest mean): outside both bounds | a mean has no breakdown point |
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from driveloop.federated.client import FAULTS
from driveloop.federated.server import STRATEGIES, ServerSettings, load_checkpoint, run_rounds
from tests.fakes.flower_grid import FakeGrid

N, F = 10, 2
BASE = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
D = sum(a.size for a in BASE.values())
Arrays = dict[str, np.ndarray]


def unflat(x: np.ndarray) -> Arrays:
    return {"w": x[:12].reshape(4, 3).astype(np.float32), "b": x[12:].astype(np.float32)}


def flat(arrays: Arrays) -> np.ndarray:
    return np.concatenate([np.asarray(arrays["w"], np.float64).ravel(), np.asarray(arrays["b"], np.float64).ravel()])


def aggregate(tmp_path: Path, strategy: str, updates: list[np.ndarray]) -> np.ndarray:
    """The server's aggregate of one round in which vehicle i sends BASE + updates[i], all 10 examples."""
    settings = ServerSettings(run_dir=str(tmp_path / strategy), vehicles=len(updates), rounds=1, strategy=strategy,
                              trim_beta=0.2, krum_malicious=F, clip_median_factor=0.0, server_opt="none")
    with FakeGrid(len(updates), lambda i, g: ({k: g[k] + v for k, v in unflat(updates[i]).items()}, 10.0)) as grid:
        state = run_rounds(grid, settings, BASE)
    (rec,) = state["rounds"]
    assert rec["accepted"] == len(updates) and rec["clipped"] == 0 and not rec["skipped"]
    return flat(load_checkpoint(Path(settings.run_dir)).arrays)


# ---------------------------------------------------------------- known answers, no poison

MU = np.full(D, 0.5)
R = 0.125


def symmetric_fleet() -> list[np.ndarray]:
    """μ ± r·e_k for k = 0…3, plus μ twice: the mean, median, trimmed mean (cut 2) and Krum's pick are all μ."""
    out = []
    for k in range(4):
        for sign in (1.0, -1.0):
            e = np.zeros(D)
            e[k] = sign * R
            out.append(MU + e)
    return out + [MU.copy(), MU.copy()]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_returns_the_centre_of_a_symmetric_fleet(strategy: str, tmp_path: Path) -> None:
    agg = aggregate(tmp_path, strategy, symmetric_fleet())
    np.testing.assert_allclose(agg, MU, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- a poisoned minority

def honest_updates(seed: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 1.0 + 0.05 * rng.standard_normal((count, D))  # mean direction far larger than the spread


def colluding(own: np.ndarray) -> np.ndarray:
    return np.full(D, -8.0)  # every poisoned vehicle sends the same far point: Krum's worst case


def client_fault(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The vehicles' own poison (client.FAULTS) applied to the update the vehicle would have sent."""
    fn = FAULTS[name].poison
    return lambda own: flat(fn(unflat(own), BASE))


POISONS = {"scale50": client_fault("scale50"), "signflip": client_fault("signflip"), "colluding": colluding}


def poisoned_fleet(kind: str, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(updates of the 10 vehicles, the first F poisoned; honest updates as rows)."""
    drawn = honest_updates(seed, N)
    poisoned = [POISONS[kind](drawn[i]) for i in range(F)]
    honest = drawn[F:]
    return poisoned + list(honest), honest


def krum_separates(updates: list[np.ndarray], honest: np.ndarray) -> bool:
    h = max(np.linalg.norm(a - b) for a in honest for b in honest)
    d = min(np.linalg.norm(p - a) for p in updates[:F] for a in honest)
    return N > 2 * F + 2 and (N - 2 * F - 1) * d**2 > (N - F - 2) * h**2


CASES = [(kind, seed) for kind in POISONS for seed in (0, 1, 2)]


@pytest.mark.parametrize("kind,seed", CASES, ids=[f"{k}-seed{s}" for k, s in CASES])
def test_trimmed_mean_and_median_stay_within_the_honest_range(kind: str, seed: int, tmp_path: Path) -> None:
    updates, honest = poisoned_fleet(kind, seed)
    mean = honest.mean(axis=0)
    spread = np.abs(honest - mean).max()
    assert F <= int(0.2 * N) and F < N / 2  # the bounds' preconditions
    for strategy in ("trimmedavg", "fedmedian"):
        agg = aggregate(tmp_path, strategy, updates)
        assert np.all(agg >= honest.min(axis=0) - 1e-6) and np.all(agg <= honest.max(axis=0) + 1e-6), strategy
        assert np.abs(agg - mean).max() <= spread + 1e-6


@pytest.mark.parametrize("kind,seed", CASES, ids=[f"{k}-seed{s}" for k, s in CASES])
def test_krum_selects_an_honest_update(kind: str, seed: int, tmp_path: Path) -> None:
    updates, honest = poisoned_fleet(kind, seed)
    assert krum_separates(updates, honest)  # the bound's precondition holds for this fleet
    agg = aggregate(tmp_path, "krum", updates)
    assert any(np.allclose(agg, a, rtol=0, atol=1e-6) for a in honest.astype(np.float32))
    mean = honest.mean(axis=0)
    assert np.linalg.norm(agg - mean) <= max(np.linalg.norm(a - mean) for a in honest) + 1e-6


@pytest.mark.parametrize("kind,seed", CASES, ids=[f"{k}-seed{s}" for k, s in CASES])
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_a_mean_is_pulled_out_of_both_bounds(strategy: str, kind: str, seed: int, tmp_path: Path) -> None:
    updates, honest = poisoned_fleet(kind, seed)
    mean = honest.mean(axis=0)
    agg = aggregate(tmp_path, strategy, updates)
    shift = F / N * (np.mean(updates[:F], axis=0) - mean)  # equal weights: the known answer
    np.testing.assert_allclose(agg - mean, shift, rtol=1e-5, atol=1e-5)
    assert np.abs(agg - mean).max() > np.abs(honest - mean).max()  # outside the trimmed mean's / median's bound
    assert np.linalg.norm(agg - mean) > max(np.linalg.norm(a - mean) for a in honest)  # outside Krum's


def test_trimming_less_than_the_poisoned_share_breaks_the_bound(tmp_path: Path) -> None:
    """The precondition matters: with β 0.1 only one value is cut per end, and two colluders pull the
    trimmed mean out of the honest range (so the bounds above are not met by accident)."""
    updates, honest = poisoned_fleet("colluding", 0)
    settings = ServerSettings(run_dir=str(tmp_path / "t"), vehicles=N, rounds=1, strategy="trimmedavg", trim_beta=0.1,
                              clip_median_factor=0.0, server_opt="none")
    with FakeGrid(N, lambda i, g: ({k: g[k] + v for k, v in unflat(updates[i]).items()}, 10.0)) as grid:
        run_rounds(grid, settings, BASE)
    agg = flat(load_checkpoint(Path(settings.run_dir)).arrays)
    assert np.all(agg < honest.min(axis=0))
