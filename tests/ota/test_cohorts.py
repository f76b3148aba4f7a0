"""Cohorts: stable, uniform, nested."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings, strategies as st

from driveloop.core.exceptions import ConfigError
from driveloop.ota.cohorts import cohort_members, cohort_position, cohort_sizes, in_cohort, label

FLEET = [f"veh-{i:05d}" for i in range(20_000)]


def test_position_is_sha256_prefix() -> None:
    expect = int.from_bytes(hashlib.sha256(b"veh-00001").digest()[:8], "big") / 2**64
    assert cohort_position("veh-00001") == expect
    assert 0.0 <= expect < 1.0


def test_salt_changes_position() -> None:
    assert cohort_position("veh-1", "r1") != cohort_position("veh-1", "r2")


@pytest.mark.parametrize("fraction", [0.01, 0.10, 0.50])
def test_cohort_sizes_match_fraction(fraction: float) -> None:
    n = len(cohort_members(FLEET, fraction))
    # binomial: 4 standard deviations
    sd = (len(FLEET) * fraction * (1 - fraction)) ** 0.5
    assert abs(n - len(FLEET) * fraction) < 4 * sd


def test_cohorts_are_nested_across_stages() -> None:
    c1, c10, c50, c100 = (set(cohort_members(FLEET, f)) for f in (0.01, 0.10, 0.50, 1.0))
    assert c1 <= c10 <= c50 <= c100 == set(FLEET)
    assert cohort_sizes(FLEET, [0.01, 0.1, 0.5, 1.0]) == {0.01: len(c1), 0.1: len(c10), 0.5: len(c50), 1.0: len(FLEET)}


@settings(max_examples=200, deadline=None)
@given(vid=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
       a=st.floats(0, 1), b=st.floats(0, 1))
def test_membership_monotone_in_fraction(vid: str, a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    if in_cohort(vid, lo):
        assert in_cohort(vid, hi)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_fraction_rejected(bad: float) -> None:
    with pytest.raises(ConfigError):
        in_cohort("veh-1", bad)


def test_empty_id_rejected() -> None:
    with pytest.raises(ConfigError):
        cohort_position("")


def test_labels() -> None:
    assert [label(False, False), label(True, True), label(True, False)] == ["control", "shadow", "canary"]
