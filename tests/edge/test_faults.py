"""The fault table (every name maps to its behaviour, unknown names are refused with the valid ones) and the
in-process FaultyRunner."""

from __future__ import annotations

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from driveloop.contracts import observation as C
from driveloop.core.exceptions import ConfigError, ModelError
from driveloop.edge.agent import FaultSpec
from driveloop.edge.faults import FAULTS, GARBAGE_VALUE, MODEL_FAULTS, SENSOR_FAULTS, FaultyRunner, lookup
from driveloop.edge.runtime import ModelRunner
from tests.fakes.runner import FakeRunner

# name, side, what the row does (the flags that are set)
ROWS = [
    ("kill", "model", {"kills"}),
    ("hang", "model", {"hangs"}),
    ("nan", "model", {"corrupt"}),
    ("garbage", "model", {"corrupt"}),
    ("late", "model", {"late"}),
    ("error", "model", {"raises"}),
    ("stale", "sensor", {"freezes_sensors"}),
]


def _flags(name: str) -> set[str]:
    f = FAULTS[name]
    return {k for k in ("kills", "hangs", "late", "freezes_sensors") if getattr(f, k)} | (
        {"corrupt"} if f.corrupt is not None else set()) | ({"raises"} if f.raises is not None else set())


@pytest.mark.parametrize("name,side,flags", ROWS, ids=[r[0] for r in ROWS])
def test_every_fault_maps_to_its_behaviour(name: str, side: str, flags: set[str]) -> None:
    assert lookup(name) is FAULTS[name] and FAULTS[name].name == name
    assert FAULTS[name].side == side and _flags(name) == flags
    assert lookup(name, side) is FAULTS[name]  # type: ignore[arg-type]
    assert FaultSpec(name).behaviour is FAULTS[name]


def test_the_table_is_the_whole_vocabulary_in_message_order() -> None:
    assert list(FAULTS) == [r[0] for r in ROWS]
    assert MODEL_FAULTS == ("kill", "hang", "nan", "garbage", "late", "error") and SENSOR_FAULTS == ("stale",)


UNKNOWN = [
    ("unknown anywhere", "meteor", None, "unknown fault 'meteor'; valid: kill, hang, nan, garbage, late, error, stale"),
    ("unknown to the model", "meteor", "model", "unknown model fault 'meteor'; valid: kill, hang, nan, garbage, late, error"),
    ("sensor fault on the model side", "stale", "model", "unknown model fault 'stale'; valid: kill, hang, nan, garbage, late, error"),
    ("model fault on the sensor side", "kill", "sensor", "unknown sensor fault 'kill'; valid: stale"),
    ("case matters", "NaN", None, "valid: kill, hang"),
]


@pytest.mark.parametrize("name,fault,side,message", UNKNOWN, ids=[u[0] for u in UNKNOWN])
def test_unknown_faults_are_refused_with_the_valid_names(name: str, fault: str, side: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        lookup(fault, side)  # type: ignore[arg-type]


def test_every_caller_refuses_unknown_faults_from_the_table() -> None:
    with pytest.raises(ConfigError, match="valid: kill, hang, nan, garbage, late, error, stale"):
        FaultSpec("meteor")
    with pytest.raises(ConfigError, match="unknown model fault 'stale'; valid: kill, hang, nan, garbage, late, error$"):
        FaultyRunner(FakeRunner()).inject("stale")  # stale frames are injected by the sensor side


def test_output_corruptions() -> None:
    action, conf = np.zeros((3, 2), np.float32), np.ones((3, 1), np.float32)
    nan_action, nan_conf = FAULTS["nan"].corrupt(action, conf)  # type: ignore[misc]
    assert np.isnan(nan_action).all() and nan_action.shape == (3, 2) and nan_conf is conf
    g_action, g_conf = FAULTS["garbage"].corrupt(action, conf)  # type: ignore[misc]
    assert g_action.shape == (3, 5) and g_conf.shape == (3, 3)
    assert (g_action == np.float32(GARBAGE_VALUE)).all() and (g_conf == -np.float32(GARBAGE_VALUE)).all()


def test_faulty_runner_applies_each_fault() -> None:
    slept: list[float] = []
    runner = FaultyRunner(FakeRunner(), late_s=0.3, hang_s=2.0, sleep=slept.append)
    assert isinstance(runner, ModelRunner) and runner.manifest.version == 1 and runner.provider == "faulty:FakeRunner"
    batch = C.empty_batch(2)
    assert runner.run(batch)[0].shape == (2, 2)
    runner.inject("nan")
    assert np.isnan(runner.run(batch)[0]).all()
    assert np.isfinite(runner.run(batch)[0]).all()  # one-shot by default
    runner.inject("garbage")
    assert runner.run(batch)[0].shape == (2, 5)
    runner.inject("late")
    assert runner.run(batch)[0].shape == (2, 2) and slept == [0.3]
    runner.inject("hang")
    with pytest.raises(ModelError, match="hung"):
        runner.run(batch)
    assert slept == [0.3, 2.0]
    runner.inject("error")
    with pytest.raises(Fail, match="kernel failed"):  # untyped, as ONNX Runtime raises it: not a ModelError
        runner.run(batch)
    assert runner.run(batch)[0].shape == (2, 2)
    runner.inject("kill", count=None)
    for _ in range(3):
        with pytest.raises(ModelError, match="dead"):
            runner.run(batch)
    runner.clear()
    assert runner.run(batch)[0].shape == (2, 2)
    runner.inject("nan", count=0)
    assert np.isfinite(runner.run(batch)[0]).all()
