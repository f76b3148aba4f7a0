"""Server-side DP: the noise the server adds has the configured scale, the aggregate it is added to is the
uniform mean of the sampled vehicles' updates, the privacy budget is that of a maintained accountant, and
configurations the accountant does not cover are refused.

The round loop is the server's own (``run_rounds`` over an in-memory grid, ``server_opt="none"`` so the new
global model *is* the noised aggregate); the noise is Flower's, drawn from numpy's global RNG, which the
tests seed (the server never does: a known seed would let anyone subtract the noise).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.optimize import brentq

from driveloop.core.exceptions import ConfigError
from driveloop.federated.dp import DP_STRATEGIES, epsilon
from driveloop.federated.server import STRATEGIES, ServerSettings, build_strategy, load_checkpoint, run_rounds
from tests.fakes.flower_grid import FakeGrid

N = 4
ALPHA = 1e-6  # two-sided level of every statistical check: with a fixed seed each is one deterministic draw


def base(size: int) -> dict[str, np.ndarray]:
    return {"w": np.zeros((size // 10, 8), np.float32), "b": np.zeros(size // 5, np.float32)}


def known_updates(like: dict[str, np.ndarray], seed: int = 7) -> list[dict[str, np.ndarray]]:
    """Per vehicle, entries k/64 with |k| <= 4: exact in float32, so a mean of four is exact too."""
    rng = np.random.default_rng(seed)
    return [{k: (rng.integers(-4, 5, v.shape) / 64).astype(np.float32) for k, v in like.items()} for _ in range(N)]


def norm(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays.values()))


def dp_settings(run_dir: Path, **kw) -> ServerSettings:
    return ServerSettings(**{"run_dir": str(run_dir), "vehicles": N, "rounds": 1, "strategy": "fedavg", "dp": True,
                             "dp_noise_multiplier": 0.5, "dp_clipping_norm": 10.0, "clip_median_factor": 0.0,
                             "server_opt": "none", **kw})


def run_one(settings: ServerSettings, start: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]],
            weights: list[float] | None = None, drop: frozenset[int] = frozenset(), seed: int = 1234):
    """(the new global model's deviation from start, the run state) after ``settings.rounds`` rounds."""
    weights = weights or [10.0] * N

    def answer(i: int, g: dict[str, np.ndarray]):
        return None if i in drop else ({k: g[k] + updates[i][k] for k in g}, weights[i])

    np.random.seed(seed)
    with FakeGrid(N, answer) as grid:
        state = run_rounds(grid, settings, start)
    out = load_checkpoint(Path(settings.run_dir)).arrays
    return {k: np.asarray(out[k], np.float64) - start[k] for k in start}, state


def chi2_band(dof: int) -> tuple[float, float]:
    """Where S²/σ² (S² the mean square of dof N(0, σ²) draws) lies with probability 1 − ALPHA."""
    return stats.chi2.ppf(ALPHA / 2, dof) / dof, stats.chi2.ppf(1 - ALPHA / 2, dof) / dof


# ---------------------------------------------------------------- the noise

def test_dp_adds_gaussian_noise_of_std_z_c_over_n_to_the_exact_mean(tmp_path: Path) -> None:
    start = base(20_000)
    updates = known_updates(start)
    s = dp_settings(tmp_path / "dp")
    assert all(norm(u) < s.dp_clipping_norm for u in updates)  # no update is clipped: the centre is known
    got, state = run_one(s, start, updates)
    mean = {k: np.mean([u[k] for u in updates], axis=0, dtype=np.float64) for k in start}
    noise = np.concatenate([(got[k] - mean[k]).ravel() for k in start])
    sigma = s.dp_noise_multiplier * s.dp_clipping_norm / N

    lo, hi = chi2_band(noise.size)
    assert lo <= float(np.mean(noise**2)) / sigma**2 <= hi
    assert abs(float(noise.mean())) <= stats.norm.ppf(1 - ALPHA / 2) * sigma / math.sqrt(noise.size)
    assert stats.kstest(noise / sigma, "norm").pvalue > ALPHA  # Gaussian, not merely of the right variance
    # the band is narrow enough to see a miscount of one vehicle either way (σ·n/(n−1) or σ·(n−1)/n)
    assert hi < (N / (N - 1)) ** 2 and lo > ((N - 1) / N) ** 2
    assert state["rounds"][0]["accepted"] == N and not state["rounds"][0]["skipped"]


def test_without_dp_the_aggregate_is_exactly_the_mean(tmp_path: Path) -> None:
    start = base(20_000)
    updates = known_updates(start)
    got, state = run_one(dp_settings(tmp_path / "plain", dp=False), start, updates)
    for k in start:
        np.testing.assert_array_equal(got[k], np.mean([u[k] for u in updates], axis=0, dtype=np.float64))
    assert state["dp"] is None


def test_dp_weighs_every_vehicle_once_whatever_examples_it_reports(tmp_path: Path) -> None:
    """The accountant's sensitivity C/n holds for a uniform mean; a vehicle reporting 70 of 100 examples
    would move an example-weighted mean by up to 0.7·C. Under DP the centre is the uniform mean."""
    start = base(1000)
    v = {k: np.full(a.shape, 0.25, np.float32) for k, a in start.items()}
    updates = [v, v, {k: -a for k, a in v.items()}, {k: -a for k, a in v.items()}]  # uniform mean 0
    weights = [10.0, 10.0, 10.0, 70.0]  # example-weighted mean: −0.6·v
    s = dp_settings(tmp_path / "w", dp_noise_multiplier=0.01, dp_clipping_norm=norm(v) * 1.01)
    got, _ = run_one(s, start, updates, weights)
    dev = np.concatenate([got[k].ravel() for k in start])
    weighted = np.concatenate([(-0.6 * v[k]).ravel() for k in start]).astype(np.float64)
    sigma = s.dp_noise_multiplier * s.dp_clipping_norm / N
    lo, hi = chi2_band(dev.size)
    assert lo <= float(np.mean(dev**2)) / sigma**2 <= hi  # around the uniform mean (0): noise only
    assert float(np.mean((dev - weighted) ** 2)) / sigma**2 > hi  # not around the weighted one


def test_a_dp_round_without_every_sampled_update_is_skipped_and_spends_nothing(tmp_path: Path) -> None:
    """σ = z·C/n is calibrated to n updates; a mean of n − 1 moves by C/(n − 1) per vehicle."""
    start = base(1000)
    updates = known_updates(start)
    got, state = run_one(dp_settings(tmp_path / "drop", quorum_frac=0.5), start, updates, drop=frozenset({3}))
    (rec,) = state["rounds"]
    assert rec["accepted"] == N - 1 and rec["skipped"]
    assert all(not np.any(g) for g in got.values())  # the global model is unchanged
    assert state["dp"]["rounds"] == 0 and state["dp"]["epsilon"] == 0.0
    # the same round without DP aggregates the three at quorum
    _, plain = run_one(dp_settings(tmp_path / "plain", dp=False, quorum_frac=0.5), start, updates, drop=frozenset({3}))
    assert not plain["rounds"][0]["skipped"] and plain["rounds"][0]["accepted"] == N - 1


# ---------------------------------------------------------------- the budget

def exact_gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """The tight ε of ``rounds`` Gaussian mechanisms of multiplier z (Balle & Wang 2018, Thm 8: their
    composition is one Gaussian mechanism with μ = √rounds / z)."""
    mu = math.sqrt(rounds) / z

    def log_delta(eps: float) -> float:
        return math.log(stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2)))

    # δ(ε) falls with ε; the textbook bound below is a valid ε, so the root lies in [0, that bound]
    return brentq(lambda e: log_delta(e) - math.log(delta), 0.0, zcdp_epsilon(z, rounds, delta))


def zcdp_epsilon(z: float, rounds: int, delta: float) -> float:
    """The classic RDP/zCDP bound: ρ = rounds/(2z²), ε = ρ + 2√(ρ·ln(1/δ)) (Bun & Steinke 2016)."""
    rho = rounds / (2 * z * z)
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


ACCOUNTS = [(1.0, 1, 1e-5), (1.0, 10, 1e-5), (2.0, 100, 1e-5), (0.5, 5, 1e-6), (5.0, 100, 1e-5), (1.1, 50, 1e-3)]


@pytest.mark.parametrize("z,rounds,delta", ACCOUNTS, ids=[f"z{z}-T{t}-d{d:g}" for z, t, d in ACCOUNTS])
def test_the_reported_epsilon_is_valid_and_close_to_tight(z: float, rounds: int, delta: float) -> None:
    """Never below the exact ε (that would understate the privacy spent), never above the textbook bound."""
    eps = epsilon(z, rounds, delta)
    assert exact_gaussian_epsilon(z, rounds, delta) <= eps <= zcdp_epsilon(z, rounds, delta)


def test_epsilon_grows_with_rounds_shrinks_with_noise_and_starts_at_zero() -> None:
    assert epsilon(1.0, 0, 1e-5) == 0.0
    assert epsilon(1.0, 1, 1e-5) < epsilon(1.0, 2, 1e-5) < epsilon(1.0, 20, 1e-5)
    assert epsilon(2.0, 20, 1e-5) < epsilon(1.0, 20, 1e-5)
    assert epsilon(1.0, 20, 1e-3) < epsilon(1.0, 20, 1e-5)


def test_the_run_reports_the_budget_of_its_released_rounds(tmp_path: Path) -> None:
    start = base(1000)
    s = dp_settings(tmp_path / "budget", rounds=3, dp_delta=1e-4, fraction=0.5)
    _, state = run_one(s, start, known_updates(start))
    assert [r["skipped"] for r in state["rounds"]] == [False] * 3
    dp = state["dp"]
    assert {k: dp[k] for k in ("delta", "noise_multiplier", "clip_norm", "rounds", "sample_rate")} == {
        "delta": 1e-4, "noise_multiplier": 0.5, "clip_norm": 10.0, "rounds": 3, "sample_rate": 0.5}
    assert dp["epsilon"] == pytest.approx(epsilon(0.5, 3, 1e-4)) and dp["epsilon"] > 0
    assert dp["noise_stdev"] == pytest.approx(0.5 * 10.0 / 2) and dp["num_sampled_clients"] == 2


# ---------------------------------------------------------------- what the accountant does not cover

REFUSED = [
    ("median", {"strategy": "fedmedian"}, "strategy 'fedmedian'"),
    ("trimmed mean", {"strategy": "trimmedavg"}, "strategy 'trimmedavg'"),
    ("krum", {"strategy": "krum"}, "strategy 'krum'"),
    ("no noise", {"dp_noise_multiplier": 0.0}, "noise multiplier 0"),
    ("median clipping", {"clip_median_factor": 3.0}, "clip_median_factor"),
    ("delta 0", {"dp_delta": 0.0}, "delta"),
    ("delta 1", {"dp_delta": 1.0}, "delta"),
]


@pytest.mark.parametrize("name,kw,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_configurations_the_accountant_does_not_cover_are_refused(name: str, kw: dict, message: str,
                                                                  tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        dp_settings(tmp_path, **kw)
    assert message in str(e.value) and str(e.value).startswith("DP:")
    dp_settings(tmp_path, **kw, dp=False)  # the same settings without DP are fine


def test_the_dp_strategies_are_exactly_the_mean_strategies() -> None:
    assert set(DP_STRATEGIES) == {"fedavg", "fedprox"} and set(DP_STRATEGIES) <= set(STRATEGIES)
    for name in DP_STRATEGIES:
        strat = build_strategy(ServerSettings(run_dir="/r", vehicles=10, strategy=name, dp=True,
                                              clip_median_factor=0.0))
        assert type(strat).__name__ == "DifferentialPrivacyServerSideFixedClipping"
        assert type(strat.strategy).__name__ in ("FedAvg", "FedProx")
