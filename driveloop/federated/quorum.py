"""When a federated round closes: quorum or deadline, whichever comes first (pure, clock passed in).

A round samples n vehicles. It closes **complete** as soon as every sampled vehicle has answered
(a reply or an error); at the deadline it closes with what it has (stragglers are excluded, not waited
for): **with quorum** if ``need`` good replies are in, else **skipped** (the global model stays as it
was; the run goes on to the next round). It is also skipped early once so many vehicles failed that
the quorum cannot be reached. With ``close_at_quorum`` the round closes as soon as ``need`` good replies
are in, without waiting for the rest (fastest rounds, but the slowest vehicles never contribute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from driveloop.core.exceptions import ConfigError

OPEN, COMPLETE, QUORUM, SKIPPED = "open", "complete", "quorum", "skipped"


@dataclass(frozen=True)
class QuorumPolicy:
    quorum_frac: float = 0.7  # share of the sampled vehicles whose good replies make a round
    round_deadline_s: float = 300.0
    min_replies: int = 1  # never aggregate fewer than this many updates
    close_at_quorum: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.quorum_frac) and 0.0 < self.quorum_frac <= 1.0):
            raise ConfigError(f"quorum_frac must be in (0, 1], got {self.quorum_frac}")
        if not (math.isfinite(self.round_deadline_s) and self.round_deadline_s > 0):
            raise ConfigError(f"round_deadline_s must be > 0, got {self.round_deadline_s}")
        if self.min_replies < 1:
            raise ConfigError(f"min_replies must be >= 1, got {self.min_replies}")

    def needed(self, sampled: int) -> int:
        """Good replies that make a quorum of ``sampled`` vehicles."""
        return max(self.min_replies, math.ceil(self.quorum_frac * sampled - 1e-9))


def round_state(policy: QuorumPolicy, sampled: int, good: int, failed: int, started_s: float, now_s: float) -> str:
    """OPEN while the round should keep waiting; else how it closed (COMPLETE, QUORUM or SKIPPED)."""
    if sampled < 1:
        return SKIPPED
    if good + failed >= sampled:
        return COMPLETE if good >= policy.needed(sampled) else SKIPPED
    if policy.close_at_quorum and good >= policy.needed(sampled):
        return QUORUM
    if now_s - started_s >= policy.round_deadline_s:
        return QUORUM if good >= policy.needed(sampled) else SKIPPED
    if good + (sampled - good - failed) < policy.needed(sampled):
        return SKIPPED  # too many failed already: quorum cannot be reached, do not wait for the deadline
    return OPEN
