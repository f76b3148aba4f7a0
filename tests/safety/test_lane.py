"""Lane-departure guard: the rule swept across its threshold, and its place in the supervisor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from driveloop.core.exceptions import ConfigError
from driveloop.safety import LaneConfig, ModelReply, Supervisor, SupervisorConfig, SupervisorInputs
from driveloop.safety.lane import departure, predicted_offset_m

CFG = LaneConfig()
GOOD = np.array([0.5, 0.0], np.float32)
CONF = np.array([0.9], np.float32)


@pytest.mark.parametrize(
    ("name", "offset", "heading", "speed", "expected"),
    [
        ("centred, straight", 0.0, 0.0, 25.0, 0.0),
        ("drift left", 0.5, 0.02, 20.0, 0.5 + 20.0 * math.sin(0.02) * 0.5),
        ("drift right", -0.5, -0.02, 20.0, -0.5 - 20.0 * math.sin(0.02) * 0.5),
        ("standing still", 0.7, 0.3, 0.0, 0.7),
        ("heading back to the centre", 0.8, -0.05, 20.0, 0.8 - 20.0 * math.sin(0.05) * 0.5),
    ],
)
def test_predicted_offset(name: str, offset: float, heading: float, speed: float, expected: float) -> None:
    assert predicted_offset_m(offset, heading, speed, CFG.lookahead_s) == pytest.approx(expected)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_threshold_swept_from_below_to_above(sign: float) -> None:
    for k in range(-100, 101):
        offset = CFG.max_offset_m + k / 100  # 1 m below ... 1 m above the threshold, exact at it
        result = departure(sign * offset, 0.0, 20.0, CFG)
        if k > 0:
            assert result == pytest.approx(sign * offset)
        else:
            assert result is None
    # the heading term counts: just inside the lane but heading out fires, heading in does not
    inside = CFG.max_offset_m - 0.1
    heading = math.asin(0.2 / (20.0 * CFG.lookahead_s))  # 0.2 m further out over the lookahead
    assert departure(sign * inside, sign * heading, 20.0, CFG) is not None
    assert departure(sign * inside, -sign * heading, 20.0, CFG) is None


def test_lookahead_is_a_parameter() -> None:
    assert departure(1.1, 0.03, 20.0, LaneConfig(lookahead_s=0.0)) is None
    assert departure(1.1, 0.03, 20.0, LaneConfig(lookahead_s=1.0)) is not None


@pytest.mark.parametrize("kw", [{"max_offset_m": 0.0}, {"max_offset_m": -1.0}, {"lookahead_s": -0.1}])
def test_bad_lane_config_is_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        LaneConfig(**kw)


def _tick(i: int, offset: float, heading: float = 0.0) -> SupervisorInputs:
    now = round(i * 0.1, 10)
    return SupervisorInputs(now_s=now, ego_speed_mps=20.0, ego_accel_mps2=0.0, lane_offset_m=offset,
                            heading_rel_rad=heading, track=None, sensor_stamp_s=now,
                            reply=ModelReply(GOOD, CONF, now))


def test_supervisor_takes_over_on_departure_and_hands_back_in_lane() -> None:
    sup = Supervisor(SupervisorConfig())
    assert sup.step(_tick(0, 0.3)).source == "model"
    d = sup.step(_tick(1, 1.45))
    assert d.source == "fallback" and d.activation and d.reason.startswith("lane departure")
    assert d.steering_rad < 0  # steering back to the right, toward the centre
    decisions = [sup.step(_tick(i, 0.2)) for i in range(2, 30)]
    assert decisions[0].source == "fallback"  # hysteresis: not handed back at once
    assert decisions[-1].source == "model"


def test_nominal_lane_keeping_never_fires() -> None:
    sup = Supervisor()
    rng = np.random.default_rng(0)
    for i in range(2000):
        d = sup.step(_tick(i, float(rng.normal(0, 0.15)), float(rng.normal(0, 0.005))))
        assert d.source == "model", d.reason
