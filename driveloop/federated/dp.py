"""Central DP of the aggregate: which configurations the privacy accountant covers, and the budget spent.

The mechanism is Flower's ``DifferentialPrivacyServerSideFixedClipping`` (DP-FedAvg, McMahan et al. 2018):
each sampled vehicle's update Δᵢ = reply − global is clipped to L2 norm C, the strategy averages the n
clipped updates, and Gaussian noise of std σ = z·C/n is added to every weight of the average.

The budget comes from Google's ``dp-accounting`` (its RDP accountant, the one Flower's own accounted mode
wraps): adding or removing one vehicle moves the sum of clipped updates by at most C, so the mean of n
moves by at most C/n = σ/z, and each released round is a Gaussian mechanism of noise multiplier z. The
released rounds compose; ε is reported at the configured δ.

What that account assumes, and how the server keeps it:

| assumption | kept by |
|---|---|
| the aggregate is the uniform mean of the clipped updates | ``DP_STRATEGIES`` only (median, trimmed mean and Krum pick among updates: one vehicle can move them by more than C/n); every vehicle's weight is 1 (``uniform_weights``): a vehicle reporting most of the examples would move an example-weighted mean by up to C |
| the mean is over exactly the n the noise is calibrated to | a DP round aggregates only when every sampled vehicle's update was accepted (``ServerSettings.needed``); otherwise it is skipped and releases nothing |
| a vehicle's contribution depends only on its own data | median-factor clipping is refused: it rescales every update by the round's median norm, which one vehicle moves |
| noise is added | z > 0 (z = 0 gives ε = ∞) |
| no amplification by sampling | ε ignores ``fraction`` (conservative): Flower samples a fixed number with Python's ``random``, not Poisson, and who took part is visible |

Not covered, so not claimed: which vehicles took part in a round (the server sees it), and the training
metrics the vehicles report. Flower draws the noise from numpy's global RNG, which the server never seeds
(a known seed would let anyone subtract the noise); tests seed it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from driveloop.core.exceptions import ConfigError

if TYPE_CHECKING:
    from driveloop.federated.server import ServerSettings

logger = logging.getLogger(__name__)

MECHANISM = "gaussian, server-side fixed clipping (Flower DifferentialPrivacyServerSideFixedClipping)"
ACCOUNTANT = "dp-accounting RDP, add/remove one vehicle, no sampling amplification"
WEIGHT_KEY = "num-examples"  # the key Flower's strategies weight replies by (client.py sends it)

# Strategies whose aggregate is FedAvg's mean: the only ones whose sensitivity is C/n.
DP_STRATEGIES: Mapping[str, str] = MappingProxyType({
    "fedavg": "FedAvg's mean",
    "fedprox": "FedAvg's mean (the proximal term acts on the vehicles)",
})

# (what the accountant assumes, the check: the settings' problem with it or None). One table, read in order.
_Check = Callable[["ServerSettings"], "str | None"]
ASSUMPTIONS: tuple[tuple[str, _Check], ...] = (
    ("uniform mean of clipped updates", lambda s: None if s.strategy in DP_STRATEGIES else (
        f"strategy {s.strategy!r} is not covered: one vehicle can move its aggregate by more than C/n "
        f"(use {' or '.join(DP_STRATEGIES)})")),
    ("noise added", lambda s: None if s.dp_noise_multiplier > 0 and math.isfinite(s.dp_noise_multiplier) else (
        f"noise multiplier {s.dp_noise_multiplier:g} gives epsilon = infinity (use > 0)")),
    ("each contribution from the vehicle's own data", lambda s: None if s.clip_median_factor <= 0 else (
        f"clip_median_factor {s.clip_median_factor:g} rescales every update by the round's median norm, which one "
        "vehicle moves; set it to 0 (--clip-factor 0): DP's fixed clip norm bounds every update")),
    ("clip norm", lambda s: None if s.dp_clipping_norm > 0 and math.isfinite(s.dp_clipping_norm) else (
        f"clipping norm {s.dp_clipping_norm:g} must be > 0")),
    ("delta", lambda s: None if 0.0 < s.dp_delta < 1.0 else f"delta {s.dp_delta:g} must be in (0, 1)"),
)


def uncovered(settings: ServerSettings) -> list[str]:
    """The ways a DP configuration leaves the accountant's assumptions (empty: covered)."""
    return [problem for _, check in ASSUMPTIONS if (problem := check(settings)) is not None]


def check_covered(settings: ServerSettings) -> None:
    """ConfigError naming every assumption a DP configuration breaks."""
    problems = uncovered(settings)
    if problems:
        raise ConfigError("DP: " + "; ".join(problems))


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε after ``rounds`` Gaussian releases of multiplier z at δ (dp-accounting's RDP accountant)."""
    if rounds <= 0:
        return 0.0
    from dp_accounting import GaussianDpEvent, NeighboringRelation, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(SelfComposedDpEvent(GaussianDpEvent(noise_multiplier), rounds))
    return float(accountant.get_epsilon(delta))


def report(settings: ServerSettings, rounds: int) -> dict[str, Any]:
    """The privacy budget of a run that released ``rounds`` noised aggregates (for ``fl run --json``)."""
    n = settings.sampled_per_round
    return {"epsilon": epsilon(settings.dp_noise_multiplier, rounds, settings.dp_delta), "delta": settings.dp_delta,
            "noise_multiplier": settings.dp_noise_multiplier, "clip_norm": settings.dp_clipping_norm,
            "rounds": rounds, "sample_rate": n / settings.vehicles, "num_sampled_clients": n,
            "noise_stdev": settings.dp_noise_multiplier * settings.dp_clipping_norm / n,
            "mechanism": MECHANISM, "accountant": ACCOUNTANT, "weighting": "uniform (one vote per vehicle)"}


def uniform_weights(replies: Iterable[Any]) -> None:
    """Give every reply weight 1, in place: the mean the noise is calibrated to (module table)."""
    for m in replies:
        m.content["metrics"][WEIGHT_KEY] = 1
