"""Screening of model updates: every rejection reason, clipping bounds, and properties over random updates."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driveloop.core.exceptions import ConfigError
from driveloop.federated.robust import (
    RobustConfig,
    check_structure,
    clip_bound,
    clip_update,
    screen_round,
    update_norm,
)

REF = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.ones(2, dtype=np.float32)}


def upd(delta: float, **override: np.ndarray) -> dict[str, np.ndarray]:
    out = {k: (v + delta).astype(np.float32) for k, v in REF.items()}
    out.update(override)
    return out


NAN_W = np.full((3, 2), np.nan, dtype=np.float32)
INF_B = np.array([1.0, np.inf], dtype=np.float32)

REJECTIONS = [
    ("missing key", {"w": REF["w"]}, "wrong_keys"),
    ("extra key", {**upd(0.1), "x": np.zeros(1, np.float32)}, "wrong_keys"),
    ("wrong shape", upd(0.1, w=np.zeros((2, 3), np.float32)), "wrong_shape"),
    ("wrong rank", upd(0.1, b=np.zeros((2, 1), np.float32)), "wrong_shape"),
    ("wrong dtype", upd(0.1, w=np.zeros((3, 2), np.float64)), "wrong_dtype"),
    ("nan", upd(0.1, w=NAN_W), "non_finite"),
    ("inf", upd(0.1, b=INF_B), "non_finite"),
]


@pytest.mark.parametrize("name,arrays,reason", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_each_broken_update_is_rejected_with_its_reason_and_the_round_goes_on(name, arrays, reason, caplog) -> None:
    honest = [("v0", upd(0.1), 10.0), ("v1", upd(0.2), 10.0)]
    with caplog.at_level(logging.WARNING, logger="driveloop.federated.robust"):
        screen = screen_round([honest[0], ("v2", arrays, 10.0), honest[1]], REF, {"v0", "v1", "v2"}, RobustConfig(0, 0))
    assert [v.accepted for v in screen.verdicts] == [True, False, True]
    assert screen.verdicts[1].reason == reason
    assert sorted(screen.accepted) == [0, 2]
    assert reason in caplog.text and "v2" in caplog.text


def test_unknown_and_duplicate_vehicles_are_rejected() -> None:
    replies = [("v0", upd(0.1), 5.0), ("intruder", upd(0.1), 5.0), ("v0", upd(0.3), 5.0)]
    screen = screen_round(replies, REF, {"v0", "v1"}, RobustConfig(0, 0))
    assert [v.reason for v in screen.verdicts] == ["ok", "unknown_vehicle", "duplicate_vehicle"]
    assert screen.reasons() == {"ok": 1, "unknown_vehicle": 1, "duplicate_vehicle": 1}
    # without a fleet list any id is taken
    assert screen_round(replies[:2], REF, None, RobustConfig(0, 0)).verdicts[1].accepted


@pytest.mark.parametrize("n", [0.0, -3.0, 2.5, float("nan")])
def test_bad_num_examples_is_rejected(n: float) -> None:
    screen = screen_round([("v0", upd(0.1), n)], REF, None, RobustConfig(0, 0))
    assert screen.verdicts[0].reason == "bad_num_examples"


def test_scaled_update_is_clipped_to_factor_times_median() -> None:
    replies = [(f"v{i}", upd(0.1), 1.0) for i in range(4)] + [("bad", upd(5.0), 1.0)]
    screen = screen_round(replies, REF, None, RobustConfig(max_update_norm=0.0, clip_median_factor=3.0))
    honest = update_norm(upd(0.1), REF)
    assert screen.clip_norm == pytest.approx(3 * honest)
    assert [v.reason for v in screen.verdicts] == ["ok"] * 4 + ["clipped"]
    assert update_norm(screen.accepted[4], REF) == pytest.approx(3 * honest, rel=1e-5)
    assert screen.verdicts[4].clip_scale == pytest.approx(3 * 0.1 / 5.0, rel=1e-5)
    # direction is kept
    d = screen.accepted[4]["w"] - REF["w"]
    assert np.all(d > 0)


def test_absolute_cap_wins_when_smaller() -> None:
    assert clip_bound([1.0, 1.0, 1.0], RobustConfig(max_update_norm=0.5, clip_median_factor=3.0)) == 0.5
    assert clip_bound([1.0, 1.0, 1.0], RobustConfig(max_update_norm=10.0, clip_median_factor=3.0)) == 3.0
    assert clip_bound([1.0], RobustConfig(0.0, 0.0)) == math.inf
    assert clip_bound([0.0, 0.0], RobustConfig(0.0, 3.0)) == math.inf


def test_sign_flip_is_not_clipped_it_has_an_honest_norm() -> None:
    flipped = {k: (REF[k] - 0.1).astype(np.float32) for k in REF}
    replies = [(f"v{i}", upd(0.1), 1.0) for i in range(3)] + [("flip", flipped, 1.0)]
    screen = screen_round(replies, REF, None, RobustConfig())
    assert screen.verdicts[3].reason == "ok"


def test_zero_updates_are_rejected_only_when_asked() -> None:
    replies = [("v0", {k: v.copy() for k, v in REF.items()}, 1.0), ("v1", upd(0.1), 1.0)]
    assert [v.reason for v in screen_round(replies, REF, None, RobustConfig()).verdicts] == ["ok", "ok"]
    strict = screen_round(replies, REF, None, RobustConfig(reject_zero_updates=True))
    assert [v.reason for v in strict.verdicts] == ["zero_update", "ok"] and sorted(strict.accepted) == [1]


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        RobustConfig(max_update_norm=float("inf"))
    with pytest.raises(ConfigError):
        RobustConfig(clip_median_factor=float("nan"))


def test_check_structure_accepts_a_fitting_update() -> None:
    assert check_structure(upd(0.5), REF) is None


@settings(max_examples=60, deadline=None, derandomize=True)
@given(scales=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=8), cap=st.floats(0.0, 5.0),
       factor=st.floats(0.0, 5.0))
def test_property_no_accepted_update_exceeds_the_bound(scales: list[float], cap: float, factor: float) -> None:
    rng = np.random.default_rng(0)
    replies = []
    for i, s in enumerate(scales):
        replies.append((f"v{i}", {k: (v + s * rng.standard_normal(v.shape)).astype(np.float32) for k, v in REF.items()}, 1.0))
    screen = screen_round(replies, REF, None, RobustConfig(cap, factor))
    assert len(screen.accepted) == len(scales)
    for i, arrays in screen.accepted.items():
        n = update_norm(arrays, REF)
        assert n <= screen.clip_norm * (1 + 1e-4) + 1e-6
        assert n <= update_norm(replies[i][1], REF) * (1 + 1e-4) + 1e-6  # clipping never grows an update
        assert all(arrays[k].dtype == REF[k].dtype for k in REF)


def test_clip_update_identity_below_bound() -> None:
    arrays, scale = clip_update(upd(0.1), REF, update_norm(upd(0.1), REF), 100.0)
    assert scale == 1.0
    np.testing.assert_array_equal(arrays["w"], upd(0.1)["w"])
