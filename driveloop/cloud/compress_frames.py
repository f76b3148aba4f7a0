"""Recorded frames for model compression: what a student learns from and what INT8 is calibrated on.

Sources, both fleet data the cloud already holds:
- the catalog's segments (read from the object store, validated like the pipeline's input; a bad one
  is skipped and counted): segments with a safety event first, then nominal ones, the newest of each;
  every tick is a frame, flagged ``event`` when the safety layer acted on it (AEB, FCW, watchdog,
  fallback, any activation);
- the dataset versions of the parent's lineage (mined hard frames plus nominal replay), the frames the
  parent itself was fine-tuned on.

``select_calibration`` (pure) draws the INT8 calibration set: every safety-event frame up to
``event_share`` of it, the rest from all frames. Without event frames an INT8 range would be fitted to
cruising only and clip exactly the activations of the rare cases (hard braking, a car cutting in), so a
calibration set without any is refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.contracts import observation as C
from driveloop.core.exceptions import ConfigError, PipelineError, SegmentError, StorageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frames:
    """Observations in contract layout plus where each came from."""

    kinematics: np.ndarray
    lidar: np.ndarray
    grid: np.ndarray
    event: np.ndarray  # bool: the safety layer acted on this tick
    event_segment: np.ndarray  # bool: the frame's segment recorded a safety event

    def __len__(self) -> int:
        return len(self.kinematics)

    def take(self, idx: np.ndarray) -> Frames:
        return Frames(self.kinematics[idx], self.lidar[idx], self.grid[idx], self.event[idx], self.event_segment[idx])

    def batch(self, idx: np.ndarray | slice | None = None) -> dict[str, np.ndarray]:
        """A contract batch (float32, C-contiguous) of the frames at ``idx`` (all when None)."""
        sel = slice(None) if idx is None else idx
        return {name: np.ascontiguousarray(arr[sel], dtype=np.float32)
                for name, arr in zip(C.INPUT_NAMES, (self.kinematics, self.lidar, self.grid))}

    @staticmethod
    def concat(parts: Sequence[Frames]) -> Frames:
        parts = [p for p in parts if len(p)]
        if not parts:
            return empty_frames()
        return Frames(*(np.concatenate([getattr(p, f) for p in parts]) for f in Frames.__dataclass_fields__))


def empty_frames() -> Frames:
    return Frames(np.zeros((0, C.KIN_DIM), np.float32), np.zeros((0, 2, C.LIDAR_CELLS), np.float32),
                  np.zeros((0, C.GRID_CHANNELS, C.GRID_H, C.GRID_W), np.float32), np.zeros(0, bool), np.zeros(0, bool))


def _tick_event(t: Any) -> bool:
    return bool(t.activation or t.aeb or t.fcw or t.watchdog is not None or t.source == "fallback")


def segment_frames(path: Path, *, event_segment: bool) -> Frames:
    """Every tick of one (validated) segment file as a frame."""
    from driveloop.contracts.segment import read_ticks

    ticks = list(read_ticks(path))
    if not ticks:
        return empty_frames()
    return Frames(
        np.stack([np.asarray(t.kinematics, np.float32) for t in ticks]),
        np.stack([np.asarray(t.lidar, np.float32) for t in ticks]),
        np.stack([np.asarray(t.grid, np.float32) for t in ticks]),
        np.array([_tick_event(t) for t in ticks], dtype=bool),
        np.full(len(ticks), event_segment, dtype=bool),
    )


def catalog_frames(catalog_url: str, store_url: str, work_dir: Path, max_segments: int) -> tuple[Frames, dict[str, Any]]:
    """Frames of up to ``max_segments`` cataloged segments: the newest event segments (up to half), then the
    newest nominal ones; each validated against its catalog hash first. Returns (frames, stats)."""
    from driveloop.cloud.catalog import Catalog, SegmentQuery
    from driveloop.cloud.store import ObjectStore
    from driveloop.contracts.segment import validate_segment

    if max_segments < 1:
        raise ConfigError(f"max_segments must be >= 1, got {max_segments}")
    catalog = Catalog(catalog_url)
    try:
        with_event = catalog.segments(SegmentQuery(has_event=True))
        nominal = catalog.segments(SegmentQuery(has_event=False))
    finally:
        catalog.close()
    n_event = min(len(with_event), max(1, max_segments // 2))
    chosen = with_event[len(with_event) - n_event:]
    n_nominal = min(len(nominal), max_segments - len(chosen))
    chosen += nominal[len(nominal) - n_nominal:] if n_nominal else []
    store = ObjectStore(store_url)
    parts: list[Frames] = []
    rejected: list[dict[str, str]] = []
    event_segments = 0
    for rec in chosen:
        try:
            if store.is_local:
                path = Path(store.url_of(rec.sha256))
            else:  # the reader needs a local file
                path = work_dir / f"{rec.sha256}.mcap"
                with open(path, "wb") as f:
                    store.copy_to(rec.sha256, f)
            info = validate_segment(path)
            if info.sha256 != rec.sha256:
                raise SegmentError(f"content sha256 {info.sha256[:12]}… differs from the catalog's {rec.sha256[:12]}…")
            parts.append(segment_frames(path, event_segment=rec.meta.has_event))
            event_segments += int(rec.meta.has_event)
        except (SegmentError, StorageError, OSError) as e:
            logger.warning("compression frames: skipping segment %s: %s", rec.sha256[:12], e)
            rejected.append({"sha256": rec.sha256, "reason": str(e)})
    frames = Frames.concat(parts)
    stats = {"segments": len(parts), "event_segments": event_segments, "frames": len(frames),
             "event_frames": int(frames.event.sum()), "rejected": rejected}
    return frames, stats


def dataset_frames(datasets_dir: Path, versions: Sequence[str]) -> tuple[Frames, list[str]]:
    """The observations of the named dataset versions that exist under ``datasets_dir``; returns (frames, used)."""
    from driveloop.cloud.datasets import DatasetStore

    if not Path(datasets_dir).is_dir():
        return empty_frames(), []
    store = DatasetStore(datasets_dir)
    parts: list[Frames] = []
    used: list[str] = []
    for version in dict.fromkeys(versions):  # each once, in lineage order
        try:
            arrays = store.open(version).arrays()
        except StorageError as e:
            logger.info("compression frames: dataset %s not usable here: %s", version, e)
            continue
        n = len(arrays["kinematics"])
        parts.append(Frames(arrays["kinematics"], arrays["lidar"], arrays["grid"], np.zeros(n, bool), np.zeros(n, bool)))
        used.append(version)
    return Frames.concat(parts), used


def select_calibration(frames: Frames, n: int, event_share: float, seed: int) -> np.ndarray:
    """Row indices of the INT8 calibration set (sorted): event frames first, up to ``ceil(n * event_share)``,
    the rest drawn from the frames without an event (from the unpicked events too only when those run short), so
    the share is what the caller asked for; all frames when there are fewer than ``n``.

    PipelineError when ``frames`` holds no safety-event frame (see module docstring).
    """
    if n < 1 or not 0.0 < event_share <= 1.0:
        raise ConfigError(f"calibration needs n >= 1 and event_share in (0, 1], got {n}, {event_share}")
    events = np.flatnonzero(frames.event)
    if len(events) == 0:
        raise PipelineError("no recorded frame with a safety event to calibrate on: INT8 ranges fitted to nominal "
                            "driving only would clip the rare cases (record and ingest segments with events first)")
    if len(frames) <= n:
        return np.arange(len(frames))
    rng = np.random.default_rng(seed)
    k = min(len(events), math.ceil(n * event_share))
    picked = rng.choice(events, size=k, replace=False)
    rest = np.flatnonzero(~np.asarray(frames.event, dtype=bool))
    if len(rest) < n - k:
        rest = np.setdiff1d(np.arange(len(frames)), picked)
    picked = np.concatenate([picked, rng.choice(rest, size=n - k, replace=False)])
    return np.sort(picked)
