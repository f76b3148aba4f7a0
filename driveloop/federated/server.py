"""The aggregation side: a Flower ServerApp (Message API) with quorum/deadline, screening and resume.

Each round the server:

1. asks the strategy (FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum; optionally wrapped in Flower's
   server-side fixed-clipping DP, only where its accountant's assumptions hold: ``dp.py``) which vehicles
   to sample and what to send them;
2. pushes the messages and pulls replies until the round closes (``_quorum.round_state``): every
   vehicle answered, or a quorum of good replies is in, or the deadline passed. Stragglers and
   dropouts are excluded, not waited for; without quorum the round is **skipped**, not the run;
3. screens the replies (``robust.screen_round``): unknown vehicle, duplicate, wrong keys/shape/dtype,
   NaN/Inf are rejected with a logged reason; accepted updates are norm-clipped;
4. lets the strategy aggregate the accepted replies (under DP: only when every sampled vehicle's update
   was accepted, each weighted 1); the server optimiser (Adam by default, ``_server_opt``: why) takes its
   step from the current global model toward that aggregate;
5. **checkpoints** atomically (``<run_dir>/checkpoint.npz``: the global tensors, the server optimiser's
   moments and the round history in one file, temp + fsync + rename). A restarted server with the same
   ``run_dir`` resumes after the last completed round, on the same optimiser trajectory.

Every reply that reached the server is described in ``<run_dir>/replies.jsonl`` (``describe_reply``: its
records, keys, shapes and numbers, never a tensor's values): the audit of what left each vehicle.

Settings come from the Flower run config (``server.*``), in the simulation as in a deployment: the driver
(``run.simulate``, ``run.run_deployed``) follows a run through its checkpoint, not through callbacks.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import ConfigError, FederatedError
from driveloop.core.logfmt import bind, log_event, unbind
from driveloop.federated import dp as _dp
from driveloop.federated.fl_metrics import write_round_metrics
from driveloop.federated._server_opt import ServerOptConfig, ServerOptState, server_step
from driveloop.federated.quorum import OPEN, SKIPPED, QuorumPolicy, round_state
from driveloop.federated.robust import RobustConfig, check_reply, screen_round

logger = logging.getLogger(__name__)

# Strategy name -> builder(flwr.serverapp.strategy module, settings, the arguments all strategies share).
# One table, read by the settings check and build_strategy; its order is that of the valid names in errors.
StrategyBuilder = Callable[[Any, "ServerSettings", dict[str, Any]], Any]
STRATEGY_BUILDERS: Mapping[str, StrategyBuilder] = MappingProxyType({
    "fedavg": lambda fs, s, common: fs.FedAvg(**common),
    "fedprox": lambda fs, s, common: fs.FedProx(**common, proximal_mu=s.proximal_mu),
    "fedmedian": lambda fs, s, common: fs.FedMedian(**common),
    "trimmedavg": lambda fs, s, common: fs.FedTrimmedAvg(**common, beta=s.trim_beta),
    "krum": lambda fs, s, common: fs.Krum(**common, num_malicious_nodes=s.krum_malicious),
})
STRATEGIES = tuple(STRATEGY_BUILDERS)
CHECKPOINT = "checkpoint.npz"
_STATE_KEY = "__state_json__"
_OPT_PREFIX = "__server_opt__/"
_POLL_S = 0.05
REPLY_LOG = "replies.jsonl"
_REASON_CHARS = 300  # of an error reply's reason in the audit: its end names the error (Ray prefixes a traceback)
RoundCallback = Callable[[dict[str, Any]], None]
ReplyCallback = Callable[[int, Any], None]  # (round, reply Message): sees every reply as it arrives (the audit)


class Clock(NamedTuple):
    """Where the round loop reads the time and waits between polls; tests pass a simulated one."""

    now_s: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


WALL_CLOCK = Clock()


@dataclass(frozen=True)
class ServerSettings:
    """Flat (run-config compatible) settings of the aggregation server.

    The defaults are those of ``driveloop fl run`` and the demo (``FlRunConfig`` composes these settings).
    """

    run_dir: str = ""  # required to run; FlRunConfig names it (a digest of the settings, or --run)
    vehicles: int = 10  # the fleet: vehicle ids fl000 … fl{vehicles-1}; replies from others are rejected
    rounds: int = 100  # one gradient step each (VehicleSettings); docs/BENCHMARKS.md: 100 reach the central result
    strategy: str = "fedavg"  # a key of STRATEGY_BUILDERS
    fraction: float = 1.0
    quorum_frac: float = 0.6
    round_deadline_s: float = 300.0
    close_at_quorum: bool = False
    max_update_norm: float = 0.0
    clip_median_factor: float = 3.0
    proximal_mu: float = 0.01
    trim_beta: float = 0.2
    krum_malicious: int = 1
    dp: bool = False
    dp_noise_multiplier: float = 0.1
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5  # the δ the privacy budget ε is reported at
    server_opt: str = "adam"  # applied to every strategy's aggregate (federated/_server_opt.py)
    server_lr: float = 3e-4
    server_beta1: float = 0.9
    server_beta2: float = 0.99

    def __post_init__(self) -> None:
        strategy_builder(self.strategy)  # ConfigError listing the valid names
        if self.vehicles < 1 or self.rounds < 1:
            raise ConfigError("a federated run needs >= 1 vehicle and >= 1 round")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.dp:
            _dp.check_covered(self)  # ConfigError naming each assumption of the accountant it breaks
        QuorumPolicy(self.quorum_frac, self.round_deadline_s)  # validates both
        RobustConfig(self.max_update_norm, self.clip_median_factor)
        ServerOptConfig(self.server_opt, self.server_lr, self.server_beta1, self.server_beta2)  # validates

    @property
    def quorum(self) -> QuorumPolicy:
        return QuorumPolicy(self.quorum_frac, self.round_deadline_s, close_at_quorum=self.close_at_quorum)

    @property
    def robust(self) -> RobustConfig:
        return RobustConfig(self.max_update_norm, self.clip_median_factor, reject_zero_updates=self.dp)

    @property
    def optimizer(self) -> ServerOptConfig:
        return ServerOptConfig(self.server_opt, self.server_lr, self.server_beta1, self.server_beta2)

    @property
    def sampled_per_round(self) -> int:
        return max(1, int(self.vehicles * self.fraction))

    def needed(self, sampled: int) -> int:
        """Accepted updates a round must have to aggregate: the quorum, or under DP all the n that the
        noise is calibrated to (``sampled_per_round``, also when fewer instructions went out)."""
        return max(sampled, self.sampled_per_round) if self.dp else self.quorum.needed(sampled)

    def known_vehicles(self) -> set[str]:
        from driveloop.federated.client import vehicle_id_for

        return {vehicle_id_for(i) for i in range(self.vehicles)}

    def dp_parameters(self, released_rounds: int) -> dict[str, Any] | None:
        """The privacy budget after ``released_rounds`` noised aggregates (None without DP)."""
        return _dp.report(self, released_rounds) if self.dp else None

    def to_run_config(self) -> dict[str, Any]:
        return {f"server.{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> ServerSettings:
        kw = {f.name: run_config[f"server.{f.name}"] for f in fields(cls) if f"server.{f.name}" in run_config}
        if "run_dir" not in kw or "vehicles" not in kw:
            raise ConfigError("the run config lacks server.run_dir / server.vehicles")
        return cls(**kw)


def strategy_builder(name: str) -> StrategyBuilder:
    """The builder of strategy ``name``; ConfigError listing the valid names when there is none."""
    try:
        return STRATEGY_BUILDERS[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}") from None


def build_strategy(s: ServerSettings) -> Any:
    """The Flower strategy for ``s.strategy`` (train only: the gate evaluates, not the vehicles)."""
    from flwr.serverapp import strategy as fs

    common = {"fraction_train": s.fraction, "fraction_evaluate": 0.0, "min_train_nodes": s.sampled_per_round,
              "min_available_nodes": s.vehicles}
    strat = strategy_builder(s.strategy)(fs, s, common)
    if s.dp:
        strat = fs.DifferentialPrivacyServerSideFixedClipping(strat, s.dp_noise_multiplier, s.dp_clipping_norm,
                                                              s.sampled_per_round)
    return strat


# ---------------------------------------------------------------- checkpoint

class Checkpoint(NamedTuple):
    arrays: dict[str, np.ndarray]  # the global model after the last completed round
    state: dict[str, Any]  # completed_round, the round log, settings
    optimizer: ServerOptState  # the server optimiser's step and moments


def save_checkpoint(run_dir: Path, arrays: dict[str, np.ndarray], state: dict[str, Any],
                    optimizer: ServerOptState | None = None) -> Path:
    """Global tensors + server optimiser state + run state in one file, atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT
    opt = optimizer if optimizer is not None else ServerOptState()
    payload = dict(arrays) | {_OPT_PREFIX + k: a for k, a in opt.to_arrays().items()}
    state = {**state, "server_opt_step": opt.step}
    payload[_STATE_KEY] = np.frombuffer(json.dumps(state, default=float).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **payload)
    write_atomic(path, buf.getvalue())
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last completed round's checkpoint, or None when the run has not checkpointed yet."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            state = json.loads(bytes(z[_STATE_KEY]).decode())
            arrays = {k: z[k] for k in z.files if k != _STATE_KEY and not k.startswith(_OPT_PREFIX)}
            opt = {k[len(_OPT_PREFIX):]: z[k] for k in z.files if k.startswith(_OPT_PREFIX)}
    except (OSError, ValueError, KeyError) as e:
        raise FederatedError(f"checkpoint {path} is unreadable: {e}") from e
    return Checkpoint(arrays, state, ServerOptState.from_arrays(int(state.get("server_opt_step", 0)), opt))


# ---------------------------------------------------------------- the round loop

def _to_numpy(record: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(a.numpy()) for k, a in record.items()}


def _to_record(arrays: dict[str, np.ndarray]) -> Any:
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _unpack(m: Any) -> tuple[str, dict[str, np.ndarray], float]:
    """(claimed vehicle id, tensors, num-examples) of a reply; missing parts come back empty."""
    c = m.content
    vid = str(c["meta"].get("vehicle-id", "?")) if "meta" in c.config_records else "?"
    arrays = _to_numpy(c["arrays"]) if "arrays" in c.array_records else {}
    n = float(c["metrics"].get("num-examples", 0)) if "metrics" in c.metric_records else 0.0
    return vid, arrays, n


def _collect(grid: Any, message_ids: list[str], policy: QuorumPolicy, started_s: float,
             usable: Callable[[Any], bool], on_reply: Callable[[Any], None] | None,
             clock: Clock) -> tuple[list[Any], list[Any], str]:
    """Pull replies until the round closes; (replies with content, error replies, how it closed).

    Only replies that ``usable`` accepts count toward the quorum; an error or a rejected update counts
    as a failure (so a round full of broken updates does not close early "with quorum")."""
    good: list[Any] = []
    errors: list[Any] = []
    n_usable = n_failed = 0
    waiting = set(message_ids)
    while True:
        if waiting:
            for reply in grid.pull_messages(list(waiting)):
                waiting.discard(reply.metadata.reply_to_message_id)
                if on_reply is not None:
                    on_reply(reply)
                if reply.has_error():
                    errors.append(reply)
                    n_failed += 1
                else:
                    good.append(reply)
                    if usable(reply):
                        n_usable += 1
                    else:
                        n_failed += 1
        state = round_state(policy, len(message_ids), n_usable, n_failed, started_s, clock.now_s())
        if state != OPEN:
            return good, errors, state
        clock.sleep(_POLL_S)


def run_rounds(grid: Any, settings: ServerSettings, initial: dict[str, np.ndarray],
               on_round: RoundCallback | None = None, on_reply: ReplyCallback | None = None,
               clock: Clock = WALL_CLOCK) -> dict[str, Any]:
    """Run (or resume) the rounds; returns the final run state (also in the checkpoint)."""
    from flwr.app import ConfigRecord

    if not settings.run_dir:
        raise ConfigError("the server settings name no run_dir to checkpoint into")
    run_dir = Path(settings.run_dir)
    strategy = build_strategy(settings)
    resumed = load_checkpoint(run_dir)
    if resumed is not None:
        arrays, state, opt = resumed
        state.pop("finished", None)  # set again when the rounds asked for now are done
        logger.info("resuming federated run %s after round %d", run_dir.name, state["completed_round"])
    else:
        arrays, state, opt = dict(initial), {"completed_round": 0, "rounds": [], "settings": asdict(settings)}, ServerOptState()
    known = settings.known_vehicles()
    for rnd in range(state["completed_round"] + 1, settings.rounds + 1):
        round_context = bind(fl_round=rnd)  # every line of this round carries fl.round
        started = clock.now_s()
        messages = list(strategy.configure_train(rnd, _to_record(arrays), ConfigRecord({"server-round": rnd}), grid))
        ids = [i for i in grid.push_messages(messages) if i]
        seen: set[str] = set()

        def usable(m: Any, seen: set[str] = seen, reference: dict[str, np.ndarray] = arrays) -> bool:
            vid, arr, n = _unpack(m)
            ok = check_reply(vid, arr, n, reference, known, seen) is None
            seen.add(vid)
            return ok

        seen_reply = None if on_reply is None else (lambda m, rnd=rnd: on_reply(rnd, m))
        good, errors, closed = _collect(grid, ids, settings.quorum, started, usable, seen_reply, clock)
        replies = [_unpack(m) for m in good]
        screen = screen_round(replies, arrays, known, settings.robust)
        accepted = []
        # In vehicle order, not arrival order: the strategy sums the replies in the order given, and a float
        # sum in arrival order differs in its last bits from run to run (so would the candidate).
        for i in sorted(screen.accepted, key=lambda i: screen.verdicts[i].vehicle_id):
            good[i].content["arrays"] = _to_record(screen.accepted[i])
            accepted.append(good[i])
        enough = len(accepted) >= settings.needed(len(ids)) if ids else False
        new_arrays = None
        if closed != SKIPPED and enough:
            from flwr.serverapp.exception import InconsistentMessageReplies

            if settings.dp:
                _dp.uniform_weights(accepted)
            try:
                agg, _metrics = strategy.aggregate_train(rnd, accepted)
            except (InconsistentMessageReplies, ValueError, ZeroDivisionError) as e:
                logger.warning("round %d: the strategy refused to aggregate: %s", rnd, e)
                agg = None
            new_arrays = _to_numpy(agg) if agg is not None else None
        times = [float(m.content["metrics"].get("train-time-s", 0.0)) for m in good if "metrics" in m.content.metric_records]
        record = {
            "round": rnd, "sampled": len(ids), "replied": len(good), "failed": len(errors),
            "accepted": len(accepted), "participants": sorted(screen.verdicts[i].vehicle_id for i in screen.accepted),
            "rejected": [{"vehicle": v.vehicle_id, "reason": v.reason, "detail": v.detail} for v in screen.rejected],
            "clipped": sum(1 for v in screen.verdicts if v.reason == "clipped"),
            "closed": closed, "skipped": new_arrays is None, "wall_s": round(clock.now_s() - started, 3),
            "median_client_s": float(np.median(times)) if times else None,
        }
        if new_arrays is None:
            log_event(logger, logging.WARNING, "fl.round.skipped", "round %d skipped: %d accepted of %d sampled (%s)",
                      rnd, len(accepted), len(ids), closed)
        else:
            arrays, opt = server_step(arrays, new_arrays, opt, settings.optimizer)
        state["rounds"].append(record)
        state["completed_round"] = rnd
        save_checkpoint(run_dir, arrays, state, opt)
        write_round_metrics(run_dir, state, time.time())
        logger.info("round %d: %s", rnd, {k: v for k, v in record.items() if k != "participants"})
        unbind(round_context)
        if on_round is not None:
            on_round(record)
    state["dp"] = settings.dp_parameters(sum(1 for r in state["rounds"] if not r["skipped"]))
    state["finished"] = True
    save_checkpoint(run_dir, arrays, state, opt)
    return state


def describe_reply(m: Any) -> dict[str, Any]:
    """What a reply carried, without a tensor's values: each record's keys, the arrays' shapes and dtypes,
    the metrics' and config's values; an error reply, its code and reason."""
    if m.has_error():
        return {"error": {"code": int(m.error.code), "reason": (m.error.reason or "")[-_REASON_CHARS:]}}
    c = m.content
    return {
        "arrays": {name: {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in rec.items()}
                   for name, rec in c.array_records.items()},
        "metrics": {name: dict(rec) for name, rec in c.metric_records.items()},
        "config": {name: dict(rec) for name, rec in c.config_records.items()},
    }


def read_reply_log(run_dir: Path | str) -> list[dict[str, Any]]:
    """The run's reply audit (``REPLY_LOG``), one ``{"round", "reply"}`` per reply in arrival order."""
    path = Path(run_dir) / REPLY_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_server_app() -> Any:
    """The ServerApp: settings from the run config, start weights from the run's ``initial.npz`` (both
    written by the driver or ``driveloop fl start``); every reply is described in ``REPLY_LOG``."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        s = ServerSettings.from_run_config(dict(context.run_config))
        with np.load(Path(s.run_dir) / "initial.npz", allow_pickle=False) as z:
            start = {k: z[k] for k in z.files}
        with open(Path(s.run_dir) / REPLY_LOG, "a", encoding="utf-8") as audit:

            def on_reply(rnd: int, m: Any) -> None:
                audit.write(json.dumps({"round": rnd, "reply": describe_reply(m)}, default=str) + "\n")
                audit.flush()

            run_rounds(grid, s, start, on_reply=on_reply)

    return app
