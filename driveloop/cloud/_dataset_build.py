"""Building a dataset version's arrays from validated segments: per segment decode -> score -> label,
then a batch-wide selection (rarity needs every segment) and the selected frames as contract arrays.

Two drivers share every step: ``build_arrays_with_ray`` (the cloud: ``ray.data.read_mcap`` over the
files, one Ray map per segment, Ray Data sized by ``compute=TaskPoolStrategy``) and
``build_arrays_local`` (a vehicle fine-tuning on its own spool in federated mode: no Ray, no upload).
Both give byte-identical arrays for the same segments and settings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.core.exceptions import PipelineError

logger = logging.getLogger(__name__)

_OBS = ("kinematics", "lidar", "grid")
_ACC = ("nominal", "accel_err", "steer_err", "event_ahead", "hazard")
_LIGHT = ("segment", "frame_index", "scenario", "bin_key", "is_event", "part_event", "part_ttc", "part_confidence",
          "part_disagreement", "nominal", "accel_err", "steer_err", "event_ahead", "hazard")


def frame_rows(ticks: list[Any], sha: str, scenario: str, mining: dict[str, Any], labeler: dict[str, Any]) -> dict[str, np.ndarray]:
    """One segment's ticks -> one row per frame: score parts, labels, accuracy parts, observations."""
    from driveloop.cloud.labeling import LabelerConfig, accuracy_parts, label_segment
    from driveloop.cloud.mining import MiningConfig, frames_from_ticks, score_frames

    frames = frames_from_ticks(ticks, sha, scenario)
    mcfg, lcfg = MiningConfig(**mining), LabelerConfig(**labeler)
    scores = score_frames(frames, mcfg)
    labels = label_segment(frames, lcfg)
    acc = accuracy_parts(frames, labels, lcfg)
    n = len(frames)
    return {
        "segment": np.array([sha] * n, dtype=object),
        "frame_index": np.arange(n, dtype=np.int64),
        "scenario": np.array([scenario] * n, dtype=object),
        "bin_key": np.array(scores.bin_keys, dtype=object),
        "is_event": scores.event,
        **{f"part_{k}": v for k, v in scores.parts.items()},
        **{k: v for k, v in acc.items() if k != "hazard"},
        "hazard": labels.hazard,
        "time_to_hazard_s": labels.time_to_hazard_s,
        "target_action": labels.target_action,
        "kinematics": frames.kinematics,
        "lidar": frames.lidar,
        "grid": frames.grid,
    }


def _segment_rows(group: Any, *, meta: dict[str, tuple[str, str]], mining: dict[str, Any], labeler: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray map over one segment's messages (all topics, a pyarrow table): decode the ticks, then ``frame_rows``."""
    from driveloop.contracts.segment import TICK_TOPICS, decode_tick

    path = str(Path(group.column("path")[0].as_py()).resolve())
    sha, scenario = meta[path]
    by_topic: dict[str, list[tuple[int, dict[str, Any]]]] = {t: [] for t in TICK_TOPICS}
    for topic, data in zip(group.column("topic").to_pylist(), group.column("data").to_pylist()):
        if topic in by_topic:
            by_topic[topic].append((int(data["tick"]), data))
    for rows in by_topic.values():
        rows.sort(key=lambda r: r[0])
    ticks = [decode_tick({t: by_topic[t][i][1] for t in TICK_TOPICS}) for i in range(len(by_topic[TICK_TOPICS[0]]))]
    return frame_rows(ticks, sha, scenario, mining, labeler)


def _keep_selected(batch: dict[str, np.ndarray], *, hard: dict[str, list[int]], replay: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Keep the selected frames and tag each as hard or replay (a Ray map, or called directly)."""
    seg, idx = batch["segment"], batch["frame_index"]
    hard_sets = {k: set(v) for k, v in hard.items()}
    replay_sets = {k: set(v) for k, v in replay.items()}
    is_hard = np.array([int(i) in hard_sets.get(s, ()) for s, i in zip(seg, idx)], dtype=bool)
    is_replay = np.array([int(i) in replay_sets.get(s, ()) for s, i in zip(seg, idx)], dtype=bool)
    keep = is_hard | is_replay
    out = {k: batch[k][keep] for k in ("segment", "frame_index", "target_action", "hazard", "time_to_hazard_s", *_OBS)}
    out["hard"] = is_hard[keep]
    return out


def _select(light: Any, mining: Any, labeler: Any, seed: int, order: list[str]) -> tuple[Any, Any, list[Any]]:
    """Batch-wide rarity, selection and labeler accuracy from the light (no observations) columns.

    Segments are taken in ``order`` (the caller's stable order, never content hashes: a segment's bytes
    hold wall-clock fields, so hash order differs run to run and the seeded replay draw with it)."""
    from driveloop.cloud.labeling import summarize_accuracy
    from driveloop.cloud.mining import FrameScores, bin_counts, finish_scores, select_frames

    if light.empty:
        raise PipelineError("the segments hold no frames")
    raw_scores = []
    groups = dict(tuple(light.groupby("segment", sort=False)))
    ordered = [(sha, groups[sha].sort_values("frame_index")) for sha in order if sha in groups]
    for sha, g in ordered:
        parts = {k: g[f"part_{k}"].to_numpy(np.float64) for k in ("event", "ttc", "confidence", "disagreement")}
        raw_scores.append(FrameScores(str(sha), parts, g["bin_key"].astype(str).tolist(), g["is_event"].to_numpy(bool)))
    counts = bin_counts(raw_scores)
    finished = [finish_scores(s, counts, mining) for s in raw_scores]
    selection = select_frames(finished, mining, seed)
    if selection.n_hard + selection.n_replay == 0:
        raise PipelineError("mining selected no frames")
    # Summed in the same stable order: Ray hands the rows back grouped by file path (a content hash),
    # and a float sum in that order differs in its last bits from run to run.
    accuracy = summarize_accuracy({k: np.concatenate([g[k].to_numpy() for _, g in ordered]) for k in _ACC}, labeler)
    return selection, accuracy, finished


def _assemble(batches: list[dict[str, np.ndarray]], shas: list[str]) -> dict[str, np.ndarray]:
    """Selected rows -> dataset arrays in (segment in the caller's stable order, frame) order: same
    recordings, same bytes. ``segment_index`` is the row's position in the manifest's sorted segments."""
    batches = [b for b in batches if len(b["segment"])]
    cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    rank = {sha: i for i, sha in enumerate(shas)}
    index = {sha: i for i, sha in enumerate(sorted(shas))}
    seg_index = np.array([index[s] for s in cat["segment"]], dtype=np.int64)
    sort = np.lexsort((cat["frame_index"], np.array([rank[s] for s in cat["segment"]], dtype=np.int64)))
    return {
        "kinematics": cat["kinematics"][sort].astype(np.float32),
        "lidar": cat["lidar"][sort].astype(np.float32),
        "grid": cat["grid"][sort].astype(np.float32),
        "target_action": cat["target_action"][sort].astype(np.float32),
        "hazard": cat["hazard"][sort].astype(bool),
        "time_to_hazard_s": cat["time_to_hazard_s"][sort].astype(np.float32),
        "hard": cat["hard"][sort].astype(bool),
        "segment_index": seg_index[sort],
        "frame_index": cat["frame_index"][sort].astype(np.int64),
    }


def _stats(light: Any, selection: Any, accuracy: Any, finished: list[Any], n_segments: int, timings: dict[str, float]) -> dict[str, Any]:
    from driveloop.cloud.mining import rank_segments

    return {"frames": len(light), "hard": selection.n_hard, "replay": selection.n_replay,
            "segments": n_segments, "labeler": accuracy.as_dict(), "timings_s": timings,
            "top_segments": [{"sha256": sha, "mean_score": round(v, 4)} for sha, v in rank_segments(finished)],
            "events_by_scenario": {str(k): int(v) for k, v in light.groupby("scenario")["is_event"].sum().items()}}


class _Clock:
    def __init__(self, on_step: Callable[[str], None] | None) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()
        self._on_step = on_step

    def step(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._t, 3)
        self._t = now
        if self._on_step is not None:
            self._on_step(name)


def build_arrays_with_ray(
    segments: list[tuple[Path, str, str]], mining: Any, labeler: Any, seed: int, data_cpus: float,
    on_step: Callable[[str], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Ray Data over validated segment files: read_mcap -> per-segment score+label -> select -> arrays.

    ``segments``: (path, sha256, scenario) of files that passed ``validate_segment`` (one damaged file
    would abort the whole Ray dataset), in a stable order the dataset keeps (the pipeline sorts by
    vehicle, seed and start time). The caller has started Ray. Returns (arrays, stats).
    """
    import ray

    clock = _Clock(on_step)
    meta = {str(Path(p).resolve()): (sha, scenario) for p, sha, scenario in segments}
    pool = ray.data.TaskPoolStrategy(size=max(1, int(data_cpus)))
    try:
        raw = ray.data.read_mcap([str(Path(p).resolve()) for p, _, _ in segments], include_paths=True,
                                 include_metadata=False, override_num_blocks=len(segments))
        frames_ds = raw.groupby("path").map_groups(
            _segment_rows, batch_format="pyarrow", compute=pool,  # type: ignore[arg-type]
            fn_kwargs={"meta": meta, "mining": asdict(mining), "labeler": asdict(labeler)},
        ).materialize()
        clock.step("mine+label")
        light = frames_ds.select_columns(list(_LIGHT)).to_pandas()
    except Exception as e:  # Ray wraps worker failures in its own error types
        raise PipelineError(f"Ray Data mine/label stage failed: {e}") from e
    selection, accuracy, finished = _select(light, mining, labeler, seed, [sha for _, sha, _ in segments])
    clock.step("select")
    try:
        chosen = frames_ds.map_batches(
            _keep_selected, batch_format="numpy", compute=pool,
            fn_kwargs={"hard": {k: v.tolist() for k, v in selection.hard.items()},
                       "replay": {k: v.tolist() for k, v in selection.replay.items()}},
        )
        batches = list(chosen.iter_batches(batch_format="numpy", batch_size=None))
    except Exception as e:
        raise PipelineError(f"Ray Data selection stage failed: {e}") from e
    arrays = _assemble(batches, [sha for _, sha, _ in segments])
    clock.step("materialize")
    return arrays, _stats(light, selection, accuracy, finished, len(segments), clock.timings)


def build_arrays_local(
    segments: list[tuple[Path, str, str]], mining: Any, labeler: Any, seed: int,
    on_step: Callable[[str], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The same dataset without Ray, reading each validated segment with ``contracts.segment.read_ticks``:
    for a vehicle that fine-tunes on its own data (its segments never leave it)."""
    import pandas as pd

    from driveloop.contracts.segment import read_ticks

    clock = _Clock(on_step)
    rows = [frame_rows(list(read_ticks(p)), sha, scenario, asdict(mining), asdict(labeler)) for p, sha, scenario in segments]
    every = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    clock.step("mine+label")
    light = pd.DataFrame({k: every[k] for k in _LIGHT})
    selection, accuracy, finished = _select(light, mining, labeler, seed, [sha for _, sha, _ in segments])
    clock.step("select")
    chosen = _keep_selected(every, hard={k: v.tolist() for k, v in selection.hard.items()},
                            replay={k: v.tolist() for k, v in selection.replay.items()})
    arrays = _assemble([chosen], [sha for _, sha, _ in segments])
    clock.step("materialize")
    return arrays, _stats(light, selection, accuracy, finished, len(segments), clock.timings)
