"""When a round closes: quorum, completion, deadline, hopeless rounds (table-driven, clock passed in)."""

from __future__ import annotations

import pytest

from driveloop.core.exceptions import ConfigError
from driveloop.federated.quorum import (
    COMPLETE,
    OPEN,
    QUORUM,
    SKIPPED,
    QuorumPolicy,
    round_state,
)

P = QuorumPolicy(quorum_frac=0.7, round_deadline_s=10.0)

CASES = [
    # name, sampled, good, failed, now_s, expected
    ("nobody yet", 10, 0, 0, 1.0, OPEN),
    ("below quorum", 10, 6, 0, 9.9, OPEN),
    ("quorum reached, waits for the rest", 10, 7, 0, 1.0, OPEN),
    ("quorum reached at the deadline", 10, 7, 0, 10.0, QUORUM),
    ("quorum with failures", 10, 7, 3, 1.0, COMPLETE),
    ("all answered, enough", 10, 10, 0, 1.0, COMPLETE),
    ("all answered, too few good", 10, 5, 5, 1.0, SKIPPED),
    ("hopeless: 4 failed of 10", 10, 2, 4, 1.0, SKIPPED),
    ("still possible: 3 failed", 10, 2, 3, 1.0, OPEN),
    ("deadline without quorum", 10, 6, 0, 10.0, SKIPPED),
    ("nothing sampled", 0, 0, 0, 0.0, SKIPPED),
    ("single vehicle replied", 1, 1, 0, 0.0, COMPLETE),
]


@pytest.mark.parametrize("name,sampled,good,failed,now_s,expected", CASES, ids=[c[0] for c in CASES])
def test_round_state(name, sampled, good, failed, now_s, expected) -> None:
    assert round_state(P, sampled, good, failed, 0.0, now_s) == expected


def test_close_at_quorum_does_not_wait_for_stragglers() -> None:
    eager = QuorumPolicy(quorum_frac=0.7, round_deadline_s=10.0, close_at_quorum=True)
    assert round_state(eager, 10, 7, 0, 0.0, 1.0) == QUORUM
    assert round_state(eager, 10, 6, 0, 0.0, 1.0) == OPEN
    assert round_state(eager, 10, 10, 0, 0.0, 1.0) == COMPLETE


def test_deadline_boundary() -> None:
    assert round_state(P, 10, 5, 0, 100.0, 109.999) == OPEN
    assert round_state(P, 10, 5, 0, 100.0, 110.0) == SKIPPED


@pytest.mark.parametrize("frac,sampled,need", [(0.7, 10, 7), (0.5, 3, 2), (1.0, 4, 4), (0.01, 100, 1), (0.3, 10, 3)])
def test_needed(frac: float, sampled: int, need: int) -> None:
    assert QuorumPolicy(frac, 1.0).needed(sampled) == need


@pytest.mark.parametrize("kw", [{"quorum_frac": 0.0}, {"quorum_frac": 1.5}, {"round_deadline_s": 0.0},
                                {"round_deadline_s": float("inf")}, {"min_replies": 0}])
def test_bad_policy(kw) -> None:
    with pytest.raises(ConfigError):
        QuorumPolicy(**kw)
