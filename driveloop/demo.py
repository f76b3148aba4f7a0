"""``driveloop demo``: the whole closed loop on one machine, on embedded defaults.

Per iteration: the fleet drives its seeded routes (mixed scenarios, hazards included) with the safety
supervisor on, records and uploads; the cloud pipeline mines, auto-labels, fine-tunes and gates a
candidate while, beside it, a federated run fine-tunes on the vehicles' own data (each on about one core;
the fleet's own drives use every core: ``cloud.fleet_shards``); the better *validated* candidate is
signed and rolled out (shadow → canary → 50% → 100%) by the fleet server, whose health gates decide;
the next iteration drives on what the fleet was given. ``--inject-bad-model`` adds an iteration that
ships a deliberately worse model (gate bypassed on purpose) to show the rollout aborting by itself.

Every iteration drives the *same* seeded routes, so the iterations compare models, not luck.

``--shift ENV`` (the default: ``DEFAULT_SHIFT``): after ``shift_after`` iterations on the familiar mix the
fleet's world gains an environment the bootstrap model never saw (``mix+ENV``). The shifted data drive is cut
into ``shift_windows`` windows; after each, the shift detector (``cloud.shift``) compares per-class
intervention rates with the baseline and opens one targeted campaign (auto-approved by the operator's
policy ``auto_approve``); the gate then judges ENV's class beside every old one, and the time from the
shift to detection, to a validated candidate and to 100 % of the fleet is measured (``_demo_shift``).

Resumable: finished iterations are kept in ``<home>/demo/state.json`` (written atomically); an
interrupted run restarts its current iteration. The registry, catalog, OTA store and A/B slots are each
crash-safe on their own, so a restart finds them consistent.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from driveloop._progress import Quiet
from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import ConfigError, OtaError

logger = logging.getLogger(__name__)

Say = Callable[[str], None]
# The injected bad model's braking commands are scaled by this: -1 turns every one into as much acceleration (a
# sign error). A model that merely never brakes (0) is hardly visible to the health gates: the AEB brakes for it
# once per hazard, as for the late-braking v1, and in dense traffic seldom (8 cars x 15 s: 1 activation, v1 0).
BRAKING_SCALE = -1.0
# What the default demo's world gains after iteration 1: a slippery road (friction 0.4), the one shift the model
# iteration 1 ships still fails. Since the headway floor (safety/headway.py) and the no-regression gate, that model
# already drives aggressive cut-ins, fog and the work zone at 0-36 interventions/h, below what the live detector
# flags; at friction 0.4 it drives at 360/h and one adaptation halves it (docs/BENCHMARKS.md, bench/adaptation.py, 5 Dec).
DEFAULT_SHIFT = "slippery"


@dataclass(frozen=True)
class DemoConfig:
    iterations: int = 2  # the familiar mix, then the shifted world (``shift``)
    vehicles: int = 8
    drive_s: float = 240.0  # each iteration's data drive, per vehicle (simulated seconds): enough hazards to learn from
    window_s: float = 20.0  # one rollout health window, per vehicle
    max_windows: int = 14  # per rollout; a rollout still running then is reported as "stalled"
    fl_rounds: int = 100  # one gradient step per vehicle each (federated/_server_opt.py); ~1 min on 2 cores
    inject_bad_model: bool = False
    seed: int = 0
    port: int = 8700
    bootstrap_episodes: int = 24
    eval_duration_s: float = 20.0
    finetune_epochs: int = 10
    eval_classes: tuple[str, ...] | None = None  # None: every scenario class of the held-out suite
    bootstrap_epochs: int = 12
    shift: str | None = DEFAULT_SHIFT  # an environment the world gains after ``shift_after`` iterations (None: never)
    shift_after: int = 1  # iterations on the familiar mix first (0: the world is shifted from the start)
    shift_windows: int = 4  # the shifted data drive in this many windows: the detector looks after each
    auto_approve: str = "*"  # the operator's auto-approve policy for the loop's campaigns (cloud.shift.ApprovalPolicy)

    def __post_init__(self) -> None:
        from driveloop.cloud.shift import ApprovalPolicy
        from driveloop.sim.scenarios import ENVIRONMENTS

        if self.iterations < 1 or self.vehicles < 2:
            raise ConfigError("the demo needs >= 1 iteration and >= 2 vehicles")
        if self.shift is not None and self.shift not in ENVIRONMENTS:
            raise ConfigError(f"unknown shift environment {self.shift!r}; valid: {', '.join(ENVIRONMENTS)}")
        if self.shift_after < 0 or self.shift_windows < 1:
            raise ConfigError("shift_after must be >= 0 and shift_windows >= 1")
        ApprovalPolicy.parse(self.auto_approve)
        if min(self.drive_s, self.window_s, self.eval_duration_s) <= 0 or self.max_windows < 1:
            raise ConfigError("demo durations and max_windows must be > 0")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"bad port {self.port}")


@dataclass
class IterationResult:
    index: int
    model: str
    interventions_per_hour: float
    collisions: int
    progress: float
    distance_km: float
    segments: int = 0
    pipeline: dict[str, Any] = field(default_factory=dict)
    federated: dict[str, Any] = field(default_factory=dict)
    candidate: int | None = None
    rollout_outcome: str = "none"
    rollout_timeline: list[dict[str, Any]] = field(default_factory=list)
    fleet_versions_after: dict[str, int] = field(default_factory=dict)
    kind: str = "loop"  # "loop" | "bad-model"
    world: str = "mix"  # the scenario distribution the fleet drove ("mix+<env>" after a shift)
    classes: dict[str, dict[str, float]] = field(default_factory=dict)  # per class: hours, interventions, per_hour
    timings_s: dict[str, float] = field(default_factory=dict)  # wall seconds per stage (StageClock); not replayable


class StageClock:
    """Wall seconds per named stage, summed over repeats (a rollout is many window drives).

    Where the demo's time goes, measured in every run rather than guessed: which stages wait on each
    other and which leave a core idle. A dotted name (``rollout.drive``) is a part of its parent stage.
    Wall-clock times differ between runs, so they are no part of a reproducible demo row.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = self._clock()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + self._clock() - t0, 3)


def _write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1, default=str).encode())

class FleetServer:
    """The OTA fleet server on 127.0.0.1, in a thread of this process (dashboard included)."""

    def __init__(self, ota_dir: Path, admin_token: str, port: int) -> None:
        import uvicorn

        from driveloop.ota.server import ServerConfig, create_app

        self.app = create_app(ServerConfig(ota_dir=ota_dir, admin_token=admin_token, background_eval=False))
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                     lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="fleet-server", daemon=True)

    def __enter__(self) -> FleetServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OtaError("the fleet server did not start (is the port in use? try --port 0)")
            time.sleep(0.05)
        sock = self._server.servers[0].sockets[0]
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def _shift_tracker(demo: Demo, state: dict[str, Any]) -> Any:
    """The demo's shift tracker over the local cloud's campaign path, resumed from ``state`` when present."""
    from driveloop._demo_shift import ShiftTracker, local_ingest
    from driveloop.cloud.shift import ApprovalPolicy

    tracker = ShiftTracker(demo.config.shift, lambda: local_ingest(demo.settings),
                           ApprovalPolicy.parse(demo.config.auto_approve), say=demo.say)
    tracker.restore(state.get("shift_tracker"))
    return tracker


def demo_plan() -> dict[str, Any]:
    """Stages sized for a demo fleet of ~8 vehicles (a 1% canary of 8 cars is nobody)."""
    from driveloop.ota.controller import RolloutPlan, StageSpec
    from driveloop.ota.gates import GateTolerances

    # ~72 s of canary driving before any verdict: a 25% canary of 8 cars is 2-3 vehicles. The demo's cars
    # share one host, whose stalls reach every model group's p99 alike but not in the same window: a p99
    # within 10 ms of the control (a fifth of the 50 ms inference deadline) is no health risk here.
    tol = GateTolerances(min_vehicles=1, min_hours=0.02, min_control_hours=0.02, min_shadow_ticks=200,
                         max_disagreement_rate=0.25, max_mean_abs_diff=1.0, p99_abs_ms=10.0)
    stages = (StageSpec("shadow", 0.25, True, 0.0, 1, tol), StageSpec("canary", 0.25, False, 0.0, 2, tol),
              StageSpec("50%", 0.5, False, 0.0, 1, tol), StageSpec("100%", 1.0, False, 0.0, 1, tol))
    return RolloutPlan(stages).to_dict()


class Demo:
    """One demo run over a data directory (see the module docstring)."""

    def __init__(self, settings: Any, config: DemoConfig, say: Say) -> None:
        self.settings, self.config, self.say = settings, config, say
        self.progress: Any = Quiet()  # the CLI sets a StageProgress: a bar for each long stage (driveloop/_progress.py)
        # The fleet's drives over this many cores (None: ``settings.num_cpus``); the rows do not depend on it.
        self.fleet_shards: int | None = None
        self.dir = Path(settings.home) / "demo"
        self.state_path = self.dir / "state.json"

    # -- state ---------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text())
                if state.get("config") == self._config_json():
                    return state
                self.say("demo settings changed: earlier iterations are not reused")
            except ValueError:
                self.say("demo state unreadable: starting the iterations over")
        return {"config": self._config_json(), "iterations": []}

    def _config_json(self) -> Any:
        return json.loads(json.dumps(asdict(self.config)))  # as the state file spells it (tuples → lists)

    def _admin_token(self) -> str:
        path = self.dir / "admin_token"
        if not path.exists():
            write_atomic(path, secrets.token_urlsafe(24).encode(), mode=0o600)
        return path.read_text().strip()

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from driveloop.cloud.fleet_shards import FleetShardPool

        # The fleet's shards (one per core, a vehicle each at most): their worker processes start now, so their
        # imports and compiled kernels are ready while the model and the fleet server come up.
        shards = max(1, min(self.fleet_shards or self.settings.num_cpus, self.config.vehicles))
        with FleetShardPool(shards, device="auto") as pool:
            return self._run(pool)

    def _run(self, pool: Any) -> dict[str, Any]:
        import httpx

        from driveloop._demo_fleet import DemoFleet
        from driveloop.cloud.bootstrap import BootstrapConfig, bootstrap
        from driveloop.cloud.registry import Registry
        from driveloop.ota.director_repo import DirectorRepo
        from driveloop.ota.release import ReleaseService

        cfg, s = self.config, self.settings
        t_start = time.monotonic()
        clock = StageClock()
        state = self._load_state()
        self.say("bootstrapping model v1 (reused when present)")
        with clock("bootstrap"):
            boot = bootstrap(s.registry_dir, BootstrapConfig(episodes=cfg.bootstrap_episodes, epochs=cfg.bootstrap_epochs,
                                                             seed=cfg.seed),
                             progress=self.say)
        registry = Registry(s.registry_dir)
        releases = ReleaseService(s.ota_dir / "repo", s.ota_dir / "keys", registry)
        v1 = releases.release(boot["version"], hardware_class="any")
        director = DirectorRepo.at(s.ota_dir)
        director.bootstrap()  # its root is signed in <home>/ota/offline-root/director, never read by the server
        with FleetServer(s.ota_dir, self._admin_token(), cfg.port) as server, httpx.Client(timeout=60) as http:
            self.say(f"fleet dashboard: {server.url}/  (metrics: {server.url}/metrics)")
            fleet = DemoFleet(s.fleet_dir, server.url, self._admin_token(), cfg.vehicles, cfg.seed, http, pool)
            art = registry.get(boot["version"])
            fleet.provision(releases.trusted_root(), art.onnx_path,
                            {**art.manifest.model_dump(mode="json"), "version": v1.model_version},
                            director_root=director.trusted_root())
            tracker = _shift_tracker(self, state)
            loop = _Loop(self, fleet, registry, releases, server.url, http, tracker)
            if "fleet_clock_s" in state:  # past whatever an interrupted iteration may have reported
                loop.clock_s = float(state["fleet_clock_s"]) + cfg.drive_s + (cfg.max_windows + 1) * cfg.window_s
            loop.abort_stale_rollout(server.app.state.service.store.latest())
            done = len(state["iterations"])
            total = cfg.iterations + (1 if cfg.inject_bad_model else 0)
            for k in range(done, total):
                kind = "bad-model" if k == cfg.iterations else "loop"
                self.say(f"— iteration {k + 1}/{total} ({kind}) —")
                with clock("iterations"):
                    result = loop.iteration(k, kind)
                state["iterations"].append(asdict(result))
                state["shift_tracker"] = tracker.to_state()
                state["fleet_clock_s"] = loop.clock_s  # a resumed run's health windows must not overlap these
                _write_json_atomic(self.state_path, state)
            with clock("final_drive"):
                final = {"measure": loop.measure(tracker.world(loop.shifted(total - 1)))}
        registry.close()
        report = {"iterations": state["iterations"], "final_drive": final["measure"],
                  "dashboard": server.url, "seconds": round(time.monotonic() - t_start, 1),
                  "home": str(s.home), "timeline": tracker.windows, "timings_s": clock.seconds}
        if tracker.shifted:
            from driveloop._demo_shift import shift_report

            report["shift"] = shift_report(tracker, state["iterations"], final["measure"], cfg.shift_after)
        from driveloop._demo_report import write_report

        report["report_html"] = str(write_report(self.dir / "report", report))
        _write_json_atomic(self.dir / "report" / "report.json", report)
        return report


class _Loop:
    """The steps of one iteration, sharing the fleet, registry, release service and server."""

    def __init__(self, demo: Demo, fleet: Any, registry: Any, releases: Any, server_url: str, http: Any,
                 tracker: Any) -> None:
        self.demo, self.fleet, self.registry, self.releases = demo, fleet, registry, releases
        self.server_url, self.http, self.tracker = server_url, http, tracker
        self.cfg, self.settings, self.say = demo.config, demo.settings, demo.say
        self.clock_s = 0.0  # fleet time across windows (health report windows)
        self.timer = StageClock()  # the current iteration's stages (a new one per iteration)

    def shifted(self, k: int) -> bool:
        """Does iteration ``k`` (0-based) drive in the shifted world? The world shifts only when a loop iteration
        follows ``shift_after`` (a ``--inject-bad-model`` iteration then stays in it, but never starts it)."""
        cfg = self.cfg
        return cfg.shift is not None and cfg.shift_after < cfg.iterations and k >= cfg.shift_after

    def _drive(self, seconds: float, window_seed: int, record: bool, world: str = "mix", label: str = "",
               stage: str = "drive") -> Any:
        # Mid-rollout the fleet runs several models: each vehicle's segments name the one that drove. Approved
        # campaigns (the shift's) run beside the recorder's own triggers.
        recording = self.fleet.recording(self.settings.spool_dir, 2 * 2**30, self._campaigns()) if record else None
        with self.timer(stage), \
                self.demo.progress.stage(f"{label or 'driving'}: {len(self.fleet.vehicles)} vehicles × {seconds:g} s"):
            report = self.fleet.drive_window(self.clock_s, seconds, world, window_seed, recording=recording)
        self.tracker.observe(report, self.clock_s, seconds, label or f"window {window_seed}")
        self.clock_s += seconds
        return report

    def _campaigns(self) -> list[Any]:
        if self.tracker.campaign is None or not self.tracker.campaign.get("approved"):
            return []
        from driveloop.wiring import fetch_campaigns

        return fetch_campaigns(self.settings, self.fleet.vehicles[0].vehicle_id)

    def measure(self, world: str = "mix") -> dict[str, Any]:
        """The fleet's seeded routes in ``world``, on whatever each vehicle runs now (the number the demo
        reports). The familiar world is one drive; a shifted one ``shift_windows`` windows (same routes every
        time), so the shift detector can look after each."""
        from driveloop._demo_shift import class_rows, report_events

        n = 1 if world == "mix" else self.cfg.shift_windows
        reports = [self._drive(self.cfg.drive_s / n, w, record=True, world=world, label=f"data drive {w + 1}/{n}")
                   for w in range(n)]
        vehicles = [v for r in reports for v in r.vehicles]  # summed as one report's summary() sums them
        driven_h = sum(v.driven_s for v in vehicles) / 3600.0
        interventions = sum(v.interventions for v in vehicles)
        set_m = sum(v.set_distance_m for v in vehicles)
        distance_m = sum(v.distance_m for v in vehicles)
        return {"interventions_per_hour": round(interventions / driven_h, 3) if driven_h > 0 else 0.0,
                "collisions": sum(v.collisions for v in vehicles),
                "progress": round(distance_m / set_m, 4) if set_m > 0 else 0.0,
                "distance_km": round(distance_m / 1000.0, 4), "segments": sum(len(r.segments) for r in reports),
                "versions": self.fleet.versions(), "world": world,
                "classes": class_rows([e for r in reports for e in report_events(r, 0.0)])}

    def iteration(self, k: int, kind: str) -> IterationResult:
        self.timer = timer = StageClock()
        try:
            result = self._iteration(k, kind)
        finally:
            self.timer = StageClock()  # drives after the iteration (the final one) are not its stages
        result.timings_s = timer.seconds
        return result

    def _iteration(self, k: int, kind: str) -> IterationResult:
        self.fleet.sync()
        versions = self.fleet.versions()
        shifted = self.shifted(k)
        if shifted and not self.tracker.shifted:
            self.tracker.start_shift(self.clock_s)
        m = self.measure(self.tracker.world(shifted))
        self.say(f"fleet on {versions}: {m['interventions_per_hour']:.1f} interventions/h, "
                 f"{m['collisions']} collisions, progress {m['progress']:.2f}")
        result = IterationResult(k + 1, max(versions, key=versions.get), m["interventions_per_hour"],
                                 m["collisions"], m["progress"], m["distance_km"], m["segments"], kind=kind,
                                 world=m["world"], classes=m["classes"])
        from driveloop.wiring import upload_spool

        with self.timer("upload"):
            up = upload_spool(self.settings)
        self.say(f"uploaded {up['uploaded']} segments")
        if kind == "bad-model":
            with self.timer("bad_model"):
                candidate = self._bad_model(result.model)
        else:
            candidate = self._learn(result)
        if candidate is None:
            result.rollout_outcome = "no-candidate"
        else:
            if shifted and kind == "loop":
                self.tracker.mark("validated")
            result.candidate = candidate
            with self.timer("rollout"):
                result.rollout_outcome, result.rollout_timeline = self._rollout(str(candidate), result.model,
                                                                                self.tracker.world(shifted))
            if shifted and kind == "loop" and result.rollout_outcome == "completed":
                self.tracker.mark("adapted")
        result.fleet_versions_after = self.fleet.versions()
        self.say(f"rollout of v{candidate}: {result.rollout_outcome}; fleet now {result.fleet_versions_after}")
        return result

    # -- learning: cloud pipeline and federated round ------------------------------------------------
    def _learn(self, result: IterationResult) -> int | None:
        """The cloud pipeline and the federated run, side by side: both start from the fleet's model and
        neither reads what the other writes (the pipeline the uploaded segments, FL each vehicle's own
        spool), and each holds about one core (Ray Data or a single trainer worker; FL's clients in Flower's
        own process and Ray runtime). The federated candidate is gated and registered after the pipeline's,
        so candidate versions keep their order. Stages: ``learn`` (its wall time), ``learn.pipeline`` and
        ``learn.federated`` (overlapping), ``learn.federated_gate``."""
        from concurrent.futures import ThreadPoolExecutor

        from driveloop.cloud.evaluation import EvalSuite, GateTolerances
        from driveloop.cloud.pipeline import PipelineConfig, run_pipeline
        from driveloop.cloud.train import FinetuneConfig
        from driveloop.federated.run import finish
        from driveloop.sim.scenarios import ENVIRONMENT_SUITE

        suite = EvalSuite(duration_s=self.cfg.eval_duration_s)
        classes = dict(suite.classes) if self.cfg.eval_classes is None else {c: suite.classes[c] for c in self.cfg.eval_classes}
        tolerances = GateTolerances()
        if result.world != "mix" and self.cfg.shift is not None:
            # The new class must improve; every old one is judged beside it and may not get worse.
            classes[self.cfg.shift] = ENVIRONMENT_SUITE[self.cfg.shift]
            tolerances = GateTolerances(improve_classes=(self.cfg.shift,))
        suite = EvalSuite(classes=classes, duration_s=self.cfg.eval_duration_s)
        pconf = PipelineConfig.from_settings(self.settings, base_ref=result.model, suite=suite, tolerances=tolerances,
                                             finetune=FinetuneConfig(epochs=self.cfg.finetune_epochs),
                                             seed=self.cfg.seed + result.index)
        fl_conf = self._fl_config(result, suite, tolerances)
        with self.timer("learn"):
            with ThreadPoolExecutor(1, thread_name_prefix="federated") as beside:
                trained = beside.submit(self._train_federated, fl_conf)
                self.say("cloud pipeline: mine → label → dataset → fine-tune → gate")
                try:
                    with self.timer("learn.pipeline"), self.demo.progress.stage("cloud pipeline") as step:
                        rep = run_pipeline(pconf, on_stage=lambda name, *a: (step(0, note=name),
                                                                              self.say(f"  pipeline: {name}")))
                except BaseException:
                    if trained.exception() is not None:  # waits for it: no run is left behind, no error unsaid
                        logger.error("the federated run beside the failed pipeline failed too",
                                     exc_info=trained.exception())
                    raise
                done = trained.result()  # its own error, as the demo met it before the two ran side by side
            with self.timer("learn.federated_gate"):
                fl = finish(fl_conf, done)
        rounds = fl.get("round_log") or []
        skipped = sum(1 for r in rounds if isinstance(r, dict) and r.get("skipped"))
        self.say(f"  federated: {fl.get('rounds')} round(s) done, {skipped} skipped")
        result.pipeline = rep.to_dict()
        candidates: list[tuple[float, int]] = []
        if rep.candidate is not None and rep.candidate_stage == "validated":
            candidates.append((float(rep.gate.get("candidate", {}).get("interventions_per_hour", 1e9)), rep.candidate))
        result.federated = {k: fl.get(k) for k in ("run", "strategy", "rounds", "participants_per_round",
                                                   "candidate", "candidate_stage", "gate", "dp", "round_log")}
        if fl.get("candidate") is not None and fl.get("candidate_stage") == "validated":
            candidates.append((float(fl["gate"].get("candidate", {}).get("interventions_per_hour", 1e9)),
                               int(fl["candidate"])))
        if not candidates:
            return None
        return min(candidates)[1]

    def _fl_config(self, result: IterationResult, suite: Any, tolerances: Any) -> Any:
        """One federated run (``fl_rounds`` rounds) over the vehicles' own spools, from the fleet's model. Its
        Ray runtime gets the CPUs the pipeline leaves (the pipeline's stages hold about one at a time: Ray Data,
        then one trainer worker, then the gate's episodes), so the two together ask for ``num_cpus``."""
        from driveloop.federated.client import VehicleSettings
        from driveloop.federated.run import FlRunConfig
        from driveloop.federated.server import ServerSettings

        return FlRunConfig(vehicle=VehicleSettings(home=str(Path(self.settings.home)),
                                                   registry_dir=str(Path(self.settings.registry_dir)),
                                                   data_seed=self.cfg.seed + result.index),
                           server=ServerSettings(vehicles=self.cfg.vehicles, rounds=self.cfg.fl_rounds, strategy="fedavg"),
                           base_ref=result.model, suite=suite, tolerances=tolerances,
                           num_cpus=max(1, self.settings.num_cpus - 1), run_name=f"demo-{self.cfg.seed}-it{result.index}")

    def _train_federated(self, conf: Any) -> Any:
        """The federated rounds (in a thread beside the pipeline: no bar of its own, a line every tenth)."""
        from driveloop.federated.run import train_federated

        rounds = self.cfg.fl_rounds
        self.say(f"federated: {rounds} round(s) over {self.cfg.vehicles} vehicles' own data, beside the pipeline")

        def on_round(r: dict[str, Any]) -> None:
            if r["round"] == rounds or r["round"] % max(1, rounds // 10) == 0:
                self.say(f"  federated round {r['round']}/{rounds}: {r['accepted']}/{r['sampled']} updates accepted")

        with self.timer("learn.federated"):
            return train_federated(conf, on_round=on_round)

    # -- deliberately bad model ----------------------------------------------------------------------
    def _bad_model(self, base: str) -> int:
        """The current model with its braking sign flipped (``BRAKING_SCALE``): where it should brake it accelerates.
        In cruise it agrees with the current model (shadow passes); when it actuates, every slow-down of the
        traffic ahead becomes an AEB activation (dense traffic, 8 cars x 12 s: 9 against the current model's 0).
        Registered as validated WITHOUT the closed-loop gate, on purpose, to exercise the rollout's own
        health gates. No torch weights are kept for it: nothing may ever be fine-tuned from it."""
        import tempfile

        import torch

        from driveloop.cloud.checkpoints import load_policy
        from driveloop.cloud.export import export_onnx

        class BrakeInverter(torch.nn.Module):
            def __init__(self, net: torch.nn.Module) -> None:
                super().__init__()
                self.net = net

            def forward(self, kinematics: torch.Tensor, lidar: torch.Tensor, grid: torch.Tensor) -> Any:
                action, confidence = self.net(kinematics, lidar, grid)
                accel = action[:, 0:1]
                accel = torch.where(accel < 0, BRAKING_SCALE * accel, accel)
                return torch.cat((accel, action[:, 1:2]), dim=1), confidence

        art = self.registry.get(int(base))
        bad = BrakeInverter(load_policy(self.settings.registry_dir, art.manifest)).eval()
        with tempfile.TemporaryDirectory() as tmp:
            onnx = export_onnx(bad, Path(tmp) / "bad.onnx")
            m = self.registry.register(onnx, parent_version=art.manifest.version,
                                       training_run={"kind": "demo-injected-bad-model", "braking_scale": BRAKING_SCALE},
                                       lineage={"note": "deliberately worse (braking sign flipped); gate bypassed by the demo"})
        self.registry.set_stage(m.version, "validated", "demo --inject-bad-model: gate bypassed on purpose")
        self.say(f"injected deliberately bad model v{m.version} (accelerates where it should brake: the AEB must step in)")
        return m.version

    # -- release and staged rollout ------------------------------------------------------------------
    def _admin(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        r = self.http.request(method, f"{self.server_url}{path}", headers=self.fleet.admin, **kw)
        if r.status_code >= 400:
            raise OtaError(f"fleet server: {method} {path} → {r.status_code} {r.text[:200]}")
        return r.json()

    def abort_stale_rollout(self, latest: Any) -> None:
        """A rollout left running by an interrupted demo is aborted (everyone reverts); its iteration reruns."""
        if latest is not None and latest.state.active:
            rid = latest.state.rollout_id
            self._admin("POST", f"/v1/rollouts/{rid}/abort",
                        json={"reason": "demo restarted mid-rollout: revert, rerun the iteration"})
            self.say(f"rollout {rid} was left running by an interrupted demo: aborted")

    def _rollout(self, version: str, previous: str, world: str = "mix") -> tuple[str, list[dict[str, Any]]]:
        self.tracker.reference_from_s = self.clock_s  # the next shift's baseline: the fleet from this rollout on
        self.releases.release(int(version), hardware_class="any")
        status = self._admin("POST", "/v1/rollouts", json={"version": version, "previous_version": previous,
                                                             "plan": demo_plan()})
        rid = status["rollout_id"]
        self.say(f"rollout {rid}: v{version} signed and started (shadow → canary → 50% → 100%)")
        timeline: list[dict[str, Any]] = []
        for w in range(self.cfg.max_windows):
            actions = self.fleet.sync()
            self._drive(self.cfg.window_s, 100 + w, record=False, world=world, label=f"rollout window {w + 1}",
                        stage="rollout.drive")
            status = self._admin("POST", f"/v1/rollouts/{rid}/evaluate")
            timeline.append({"window": w + 1, "stage": status["stage"], "status": status["status"],
                             "decision": (status.get("last_decision") or {}).get("action"),
                             "reason": status["reason"], "actions": actions})
            self.say(f"  window {w + 1}: stage {status['stage']} ({status['status']}): {status['reason'][:90]}")
            if status["status"] in ("completed", "aborted"):
                break
        self.fleet.sync()  # everyone picks up the final assignment (new model, or the revert)
        self._drive(self.cfg.window_s, 99, record=False, world=world, label="after rollout",  # trial windows close
                    stage="rollout.drive")
        outcome = status["status"] if status["status"] in ("completed", "aborted") else "stalled"
        return outcome, timeline
