"""A vehicle's own training data, built on the vehicle from its own spool (nothing leaves it).

Layout per vehicle (under the vehicle's data directory)::

    spool/           the vehicle's recorded MCAP segments (edge/spool.py)
    dataset.npz      mined + hindsight-labelled arrays, rebuilt when the set of segments changes
    dataset.json     which segments (sha256) and settings produced dataset.npz

Rules it keeps:
- **Non-IID by construction**: each vehicle drives its own scenario mix, a Dirichlet draw around the
  fleet mix seeded by the vehicle id, so vehicles see different shares of cut-ins, merges and CCR cases.
- **An empty spool is filled first**: the vehicle drives ``episodes`` seeded episodes of its mix with the
  given model (the full edge loop: supervisor, recorder, spool) before it can train.
- The labelling is the cloud pipeline's code (mining + hindsight teacher) run locally, without Ray:
  the same frames, the same labels, only on this vehicle's segments. The dataset file is written
  atomically (temp + fsync + rename), so a crash never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.core.atomic import write_atomic
from driveloop.cloud.labeling import LABEL_VERSION, LabelerConfig
from driveloop.cloud.mining import MiningConfig
from driveloop.core.exceptions import ConfigError, FederatedError, SegmentError

logger = logging.getLogger(__name__)

SPOOL_QUOTA_BYTES = 512 * 1024 * 1024
_ARRAY_KEYS = ("kinematics", "lidar", "grid", "target_action", "hazard", "hard", "segment_index", "frame_index")


@dataclass(frozen=True)
class VehicleDataConfig:
    episodes: int = 3  # episodes driven to fill an empty spool
    episode_s: float = 20.0  # simulated seconds per episode
    mix_concentration: float = 1.0  # Dirichlet concentration around the fleet mix: lower = more non-IID
    min_samples: int = 64  # a vehicle with few mined frames tops up with nominal replay frames
    mining: MiningConfig = field(default_factory=MiningConfig)
    labeler: LabelerConfig = field(default_factory=LabelerConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.episodes < 1 or not self.episode_s > 0 or not self.mix_concentration > 0 or self.min_samples < 0:
            raise ConfigError("vehicle data needs episodes >= 1, episode_s > 0, mix_concentration > 0, min_samples >= 0")


def vehicle_seed(vehicle_id: str, seed: int = 0) -> int:
    """A stable per-vehicle seed (crc32 of the id, so it is the same in every process)."""
    return (zlib.crc32(vehicle_id.encode()) + 7919 * seed) % (2**31)


def vehicle_mix(vehicle_id: str, config: VehicleDataConfig) -> dict[str, float]:
    """This vehicle's scenario-class weights: a Dirichlet draw centred on the fleet mix."""
    from driveloop.sim.scenarios import MIX_WEIGHTS

    keys = list(MIX_WEIGHTS)
    base = np.array([MIX_WEIGHTS[k] for k in keys]) / sum(MIX_WEIGHTS.values())
    rng = np.random.default_rng(vehicle_seed(vehicle_id, config.seed))
    w = rng.dirichlet(base * len(keys) * config.mix_concentration)
    return dict(zip(keys, (float(x) for x in w)))


def vehicle_scenarios(vehicle_id: str, config: VehicleDataConfig) -> list[tuple[str, int]]:
    """(scenario, seed) for each episode the vehicle drives to fill its spool."""
    from driveloop.sim.scenarios import CCR_CASES

    mix = vehicle_mix(vehicle_id, config)
    keys, p = list(mix), np.array(list(mix.values()))
    base_seed = vehicle_seed(vehicle_id, config.seed)
    rng = np.random.default_rng(base_seed + 1)
    out = []
    for i in range(config.episodes):
        pick = keys[int(rng.choice(len(keys), p=p / p.sum()))]
        if pick == "ccr":
            pick = CCR_CASES[int(rng.integers(len(CCR_CASES)))]
        out.append((pick, (base_seed * 100 + i) % (2**31)))
    return out


def spool_segments(vehicle_dir: Path, vehicle_id: str) -> list[Path]:
    """This vehicle's closed segments in its spool, oldest first."""
    from driveloop.edge.spool import Spool

    spool = Spool(Path(vehicle_dir) / "spool", SPOOL_QUOTA_BYTES)
    return [e.path for e in spool.closed_segments() if e.vehicle == vehicle_id]


def ensure_spool(vehicle_dir: Path, vehicle_id: str, artifact: Any, config: VehicleDataConfig) -> list[Path]:
    """The vehicle's segments; an empty spool is first filled by driving its seeded mix with ``artifact``."""
    found = spool_segments(vehicle_dir, vehicle_id)
    if found:
        return found
    from driveloop.edge.agent import AgentConfig
    from driveloop.edge.drive import open_client, recorder_factory
    from driveloop.edge.fleet import VehiclePlan, run_fleet

    client, closeable = open_client(artifact, isolate=False, fault=None, device="cpu",
                                    simulated_deadline=True)  # a simulated vehicle: host stalls are not its model's
    factory = recorder_factory(Path(vehicle_dir) / "spool", SPOOL_QUOTA_BYTES, str(artifact.manifest.version))
    try:
        for scenario, seed in vehicle_scenarios(vehicle_id, config):
            run_fleet([VehiclePlan(vehicle_id, scenario, seed)], {"default": client}, config.episode_s, AgentConfig(),
                      factory)
    finally:
        if closeable is not None:
            closeable.close()
    found = spool_segments(vehicle_dir, vehicle_id)
    if not found:
        raise FederatedError(f"vehicle {vehicle_id} drove {config.episodes} episodes but recorded no segment")
    logger.info("vehicle %s filled its spool: %d segments", vehicle_id, len(found))
    return found


def label_segments(paths: list[Path], mining: MiningConfig, labeler: LabelerConfig, seed: int,
                   min_samples: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    """The pipeline's mine + hindsight-label + select, locally and without Ray; (arrays, segment sha256s).

    A corrupt segment is logged and skipped (the vehicle keeps the rest).
    """
    from driveloop.cloud.labeling import label_segment
    from driveloop.cloud.mining import (
        bin_counts,
        finish_scores,
        frames_from_ticks,
        score_frames,
        select_frames,
    )
    from driveloop.contracts.segment import read_ticks, validate_segment

    frames, shas = [], []
    for path in paths:
        try:
            info = validate_segment(path)
            f = frames_from_ticks(list(read_ticks(path)), info.sha256, info.meta.scenario)
        except SegmentError as e:
            logger.warning("vehicle skips segment %s: %s", Path(path).name, e)
            continue
        frames.append(f)
        shas.append(info.sha256)
    if not frames:
        raise FederatedError("no readable segment in the vehicle's spool")
    raw = [score_frames(f, mining) for f in frames]
    counts = bin_counts(raw)
    finished = [finish_scores(s, counts, mining) for s in raw]
    selection = select_frames(finished, mining, seed)
    if selection.n_hard + selection.n_replay < min_samples:  # few hard moments: more replay, up to min_samples
        ratio = (min_samples - selection.n_hard) / max(selection.n_hard, 1)
        selection = select_frames(finished, replace(mining, replay_ratio=max(ratio, mining.replay_ratio)), seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _ARRAY_KEYS}
    for seg_no, f in enumerate(frames):
        hard = selection.hard.get(f.segment_id, np.zeros(0, dtype=np.int64))
        replay = selection.replay.get(f.segment_id, np.zeros(0, dtype=np.int64))
        idx = np.sort(np.concatenate([hard, replay])).astype(np.int64)
        if not len(idx):
            continue
        labels = label_segment(f, labeler)
        parts["kinematics"].append(f.kinematics[idx])
        parts["lidar"].append(f.lidar[idx])
        parts["grid"].append(f.grid[idx])
        parts["target_action"].append(labels.target_action[idx])
        parts["hazard"].append(labels.hazard[idx])
        parts["hard"].append(np.isin(idx, hard))
        parts["segment_index"].append(np.full(len(idx), seg_no, dtype=np.int64))  # consecutive frames: the
        parts["frame_index"].append(idx)  # fine-tune's smoothness term pairs them
    if not parts["target_action"]:
        raise FederatedError("mining selected no frames from the vehicle's segments")
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    for k in ("kinematics", "lidar", "grid", "target_action"):
        arrays[k] = arrays[k].astype(np.float32)
    return arrays, shas


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())
    write_atomic(path.with_suffix(".json"), json.dumps(meta, sort_keys=True).encode())

def distill_replay(arrays: dict[str, np.ndarray], artifact: Any, batch: int = 256) -> dict[str, np.ndarray]:
    """Replay (nominal) frames get the released model's own outputs as targets, computed once with ONNX
    Runtime: every round then keeps the *released* behaviour on nominal driving (learning without
    forgetting), not the drifting round-start global model's."""
    from driveloop.edge.runtime import ModelRuntime

    replay = np.flatnonzero(~np.asarray(arrays["hard"], dtype=bool))
    if not len(replay):
        return arrays
    runtime = ModelRuntime(artifact.onnx_path, artifact.manifest, device="cpu")
    target = np.array(arrays["target_action"], dtype=np.float32, copy=True)
    for lo in range(0, len(replay), batch):
        rows = replay[lo : lo + batch]
        target[rows] = runtime.run({k: np.ascontiguousarray(arrays[k][rows]) for k in ("kinematics", "lidar", "grid")})[0]
    return {**arrays, "target_action": target}


def local_dataset(vehicle_dir: Path, vehicle_id: str, artifact: Any, config: VehicleDataConfig) -> dict[str, np.ndarray]:
    """The vehicle's labelled training arrays (driving first if its spool is empty), replay targets
    distilled from ``artifact`` (the released model); cached on disk."""
    vehicle_dir = Path(vehicle_dir)
    paths = ensure_spool(vehicle_dir, vehicle_id, artifact, config)
    key = hashlib.sha256(json.dumps({
        "segments": sorted(p.name for p in paths), "label_version": LABEL_VERSION,
        "mining": asdict(config.mining), "labeler": asdict(config.labeler), "seed": config.seed,
        "min_samples": config.min_samples, "replay_targets_from": artifact.manifest.sha256,
    }, sort_keys=True, default=str).encode()).hexdigest()
    cache = vehicle_dir / "dataset.npz"
    meta_path = cache.with_suffix(".json")
    if cache.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("key") == key:
                with np.load(cache, allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            logger.warning("vehicle %s rebuilds its dataset cache: %s", vehicle_id, e)
    arrays, shas = label_segments(paths, config.mining, config.labeler, vehicle_seed(vehicle_id, config.seed),
                                  config.min_samples)
    arrays = distill_replay(arrays, artifact)
    _write_npz_atomic(cache, arrays, {"key": key, "segments": shas, "samples": len(arrays["target_action"])})
    logger.info("vehicle %s dataset: %d samples from %d segments", vehicle_id, len(arrays["target_action"]), len(shas))
    return arrays
