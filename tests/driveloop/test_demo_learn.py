"""The demo's learning step (driveloop/demo.py ``_Loop._learn``): the federated rounds run in a thread beside the
cloud pipeline; the federated candidate is gated and registered after the pipeline's; an error on either side
reaches the demo as it did when the two ran one after the other, and none is swallowed. The pipeline, the
federated rounds and the gate are replaced by recorders here (their own tests run the real ones)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from driveloop._progress import Quiet
from driveloop.core.exceptions import FederatedError, PipelineError
from driveloop.demo import DemoConfig, IterationResult, StageClock, _Loop


class _Demo:
    def __init__(self, config: DemoConfig, settings: Any) -> None:
        self.config, self.settings, self.say, self.progress = config, settings, lambda m: None, Quiet()


def _loop(tmp_path: Path) -> _Loop:
    from driveloop.settings import Settings

    cfg = DemoConfig(vehicles=2, fl_rounds=2, eval_classes=("highway",), port=0)
    loop = object.__new__(_Loop)  # no fleet, server or registry: _learn uses none of them
    loop.demo = _Demo(cfg, Settings(home=tmp_path))  # type: ignore[assignment]
    loop.cfg, loop.settings, loop.say, loop.timer = cfg, loop.demo.settings, loop.demo.say, StageClock()
    return loop


class _Report:
    def __init__(self, candidate: int, per_hour: float) -> None:
        self.candidate, self.candidate_stage = candidate, "validated"
        self.gate = {"candidate": {"interventions_per_hour": per_hour}}

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate}


@pytest.fixture()
def sides(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Recorders for both sides: what ran, in which thread, in which order; ``fail`` names a side that raises."""
    import driveloop.cloud.pipeline as pipeline
    import driveloop.federated.run as fl_run

    seen: dict[str, Any] = {"order": [], "fail": set(), "fl_started": threading.Event()}

    def run_pipeline(conf: Any, on_stage: Any = None) -> _Report:
        assert seen["fl_started"].wait(timeout=60), "the federated rounds did not start beside the pipeline"
        seen["order"].append(("pipeline", threading.current_thread().name))
        if "pipeline" in seen["fail"]:
            raise PipelineError("pipeline broke")
        return _Report(2, 80.0)

    def train_federated(conf: Any, on_round: Any = None) -> str:
        seen["fl_started"].set()
        seen["order"].append(("federated", threading.current_thread().name))
        seen["num_cpus"] = conf.num_cpus
        if "federated" in seen["fail"]:
            raise FederatedError("federated broke")
        on_round({"round": 2, "accepted": 2, "sampled": 2})
        return "trained"

    def finish(conf: Any, trained: str) -> dict[str, Any]:
        assert trained == "trained"
        seen["order"].append(("federated_gate", threading.current_thread().name))
        return {"candidate": 3, "candidate_stage": "validated", "gate": {"candidate": {"interventions_per_hour": 70.0}},
                "rounds": 2, "round_log": []}

    monkeypatch.setattr(pipeline, "run_pipeline", run_pipeline)
    monkeypatch.setattr(fl_run, "train_federated", train_federated)
    monkeypatch.setattr(fl_run, "finish", finish)
    return seen


def test_federated_runs_beside_the_pipeline_and_is_gated_after_it(tmp_path: Path, sides: dict[str, Any]) -> None:
    loop = _loop(tmp_path)
    result = IterationResult(1, "1", 0.0, 0, 1.0, 0.0)
    assert loop._learn(result) == 3  # the validated candidate with fewer interventions per hour
    main = threading.current_thread().name
    assert sides["order"][0][0] == "federated" and sides["order"][0][1] != main
    assert sides["order"][1:] == [("pipeline", main), ("federated_gate", main)]  # pipeline's candidate first
    assert sides["num_cpus"] == 1  # of the settings' 2: the pipeline holds the other
    assert result.pipeline == {"candidate": 2} and result.federated["candidate"] == 3
    times = loop.timer.seconds
    assert set(times) == {"learn", "learn.pipeline", "learn.federated", "learn.federated_gate"}


def test_a_federated_error_reaches_the_demo(tmp_path: Path, sides: dict[str, Any]) -> None:
    sides["fail"].add("federated")
    with pytest.raises(FederatedError, match="federated broke"):
        _loop(tmp_path)._learn(IterationResult(1, "1", 0.0, 0, 1.0, 0.0))
    assert ("pipeline", threading.current_thread().name) in sides["order"]  # it ran to its end first
    assert "federated_gate" not in {name for name, _ in sides["order"]}


def test_a_pipeline_error_wins_and_the_federated_one_is_logged(tmp_path: Path, sides: dict[str, Any],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    sides["fail"].update({"pipeline", "federated"})
    with caplog.at_level(logging.ERROR, logger="driveloop.demo"), pytest.raises(PipelineError, match="pipeline broke"):
        _loop(tmp_path)._learn(IterationResult(1, "1", 0.0, 0, 1.0, 0.0))
    (record,) = [r for r in caplog.records if "failed too" in r.getMessage()]
    assert isinstance(record.exc_info[1], FederatedError)  # type: ignore[index]
