"""driveloop.sim — the simulated world: scenarios, the highway-env adapter, sensors, perception, video.

Ground truth (``world``) → sensors → the ``contracts.observation`` tensors a model sees. Imports core,
contracts and safety only; never Ray, Flower or the network. highway-env loads on first use.
"""

from __future__ import annotations

from driveloop.core.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "VehicleState": "world", "WorldSnapshot": "world", "lead_vehicle": "world", "gap_m": "world", "ttc_s": "world",
    "ScenarioSpec": "scenarios", "parse_scenario": "scenarios", "scenario_names": "scenarios",
    "CCR_CASES": "scenarios", "draw_mix": "scenarios", "SimConfig": "simulator", "Simulator": "simulator",
    "SensorConfig": "sensors", "SensorFrame": "sensors", "SensorSuite": "sensors", "observe": "sensors",
    "SensorBatch": "sensors", "observe_batch": "sensors", "observe_suites": "sensors",
    "Track": "perception", "forward_track": "perception", "judge_activation": "truth",
})
