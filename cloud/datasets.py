"""Dataset versions: immutable, content-addressed training sets built from mined and labeled frames.

A version is named by the digest of its manifest: the sorted sha256 of every source segment, the label
version, the code version (hash of the mining/labeling/dataset sources), the base model version and
the selection config. The same inputs therefore always give the same name, and a rerun on unchanged
input finds the version already built and reuses it instead of mining and labeling again.

Layout under ``root`` (``<home>/cloud/datasets``)::

    <digest>/manifest.json   the manifest (what the digest is computed from)
    <digest>/arrays.npz      the samples (see ``ARRAY_SPECS``)
    <digest>/stats.json      counts and the labeler's accuracy (not part of the digest)

A version is written into a temporary directory beside the final one, every file fsync'd, then
renamed into place in one step: a crash or a failed stage leaves no partial version, only a temp dir
that the next build removes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.edge.contract import GRID_CHANNELS, GRID_H, GRID_W, KIN_DIM, LIDAR_CELLS
from driveloop.exceptions import PipelineError, StorageError

logger = logging.getLogger(__name__)

DATASET_FORMAT = 1
_TMP_PREFIX = ".tmp-"

# name -> (per-sample shape, dtype)
ARRAY_SPECS: dict[str, tuple[tuple[int, ...], str]] = {
    "kinematics": ((KIN_DIM,), "float32"),
    "lidar": ((2, LIDAR_CELLS), "float32"),
    "grid": ((GRID_CHANNELS, GRID_H, GRID_W), "float32"),
    "target_action": ((2,), "float32"),
    "hazard": ((), "bool"),
    "time_to_hazard_s": ((), "float32"),
    "hard": ((), "bool"),  # True: mined hard frame; False: nominal replay frame
    "segment_index": ((), "int64"),  # index into manifest.segments
    "frame_index": ((), "int64"),
}


def code_version(modules: tuple[str, ...] = ("mining", "labeling", "datasets")) -> str:
    """Hash of the sources that decide what a dataset contains (a code change makes a new version)."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in modules:
        h.update(name.encode())
        h.update((here / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class DatasetManifest:
    """Everything a dataset version is a function of."""

    segments: tuple[str, ...]  # sha256 of each source segment, sorted
    label_version: str
    code_version: str
    base_model_version: int | None
    selection: dict[str, Any] = field(default_factory=dict)
    format: int = DATASET_FORMAT

    def __post_init__(self) -> None:
        if not self.segments:
            raise PipelineError("a dataset needs at least one segment")
        if list(self.segments) != sorted(set(self.segments)):
            object.__setattr__(self, "segments", tuple(sorted(set(self.segments))))
        try:
            _canonical(self.selection)
        except (TypeError, ValueError) as e:
            raise PipelineError(f"dataset selection config is not plain JSON: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["segments"] = list(self.segments)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetManifest:
        try:
            return cls(
                segments=tuple(d["segments"]), label_version=str(d["label_version"]),
                code_version=str(d["code_version"]), base_model_version=d["base_model_version"],
                selection=dict(d["selection"]), format=int(d["format"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(f"malformed dataset manifest: {e!r}") from e

    @property
    def digest(self) -> str:
        return hashlib.sha256(_canonical(self.to_dict())).hexdigest()

    @property
    def version(self) -> str:
        """The short name used in the registry and reports."""
        return f"ds-{self.digest[:16]}"


def check_arrays(arrays: dict[str, np.ndarray]) -> int:
    """Validate names, shapes and dtypes against ``ARRAY_SPECS``; returns the sample count."""
    if set(arrays) != set(ARRAY_SPECS):
        raise PipelineError(f"dataset arrays {sorted(arrays)} != expected {sorted(ARRAY_SPECS)}")
    n = len(arrays["target_action"])
    if n == 0:
        raise PipelineError("a dataset needs at least one sample")
    for name, (shape, dtype) in ARRAY_SPECS.items():
        a = arrays[name]
        if a.shape != (n, *shape) or a.dtype != np.dtype(dtype):
            raise PipelineError(f"dataset array {name}: {a.dtype}{a.shape}, expected {dtype}{(n, *shape)}")
    if not np.isfinite(arrays["target_action"]).all():
        raise PipelineError("dataset target actions must be finite")
    return n


@dataclass(frozen=True)
class DatasetVersion:
    manifest: DatasetManifest
    path: Path
    stats: dict[str, Any]

    @property
    def version(self) -> str:
        return self.manifest.version

    def arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.path / "arrays.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    @property
    def samples(self) -> int:
        return int(self.stats.get("samples", 0))


def _write_json(path: Path, data: Any) -> None:
    with open(path, "wb") as f:
        f.write(json.dumps(data, sort_keys=True, indent=2, allow_nan=True).encode())
        f.flush()
        os.fsync(f.fileno())


class DatasetStore:
    """The dataset versions under one directory (see module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, manifest: DatasetManifest) -> Path:
        return self.root / manifest.digest

    def get(self, manifest: DatasetManifest) -> DatasetVersion | None:
        """The complete version for ``manifest``, or None when it was never built."""
        p = self.path(manifest)
        if not (p / "manifest.json").is_file():
            return None
        return self._open(p)

    def open(self, digest: str) -> DatasetVersion:
        """Open a version by digest (or its ``ds-`` prefix) and check it is what it claims to be."""
        short = digest.removeprefix("ds-")
        matches = [p for p in self.root.iterdir() if p.name.startswith(short) and not p.name.startswith(_TMP_PREFIX)]
        if len(matches) != 1:
            raise StorageError(f"dataset {digest}: {'unknown' if not matches else 'ambiguous'}")
        return self._open(matches[0])

    def _open(self, p: Path) -> DatasetVersion:
        try:
            manifest = DatasetManifest.from_dict(json.loads((p / "manifest.json").read_text()))
            stats = json.loads((p / "stats.json").read_text())
        except (OSError, ValueError) as e:
            raise StorageError(f"dataset {p.name} is unreadable: {e}") from e
        if manifest.digest != p.name:
            raise StorageError(f"dataset {p.name}: manifest digest {manifest.digest} does not match its name")
        return DatasetVersion(manifest, p, stats)

    def build(
        self, manifest: DatasetManifest, produce: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]]
    ) -> tuple[DatasetVersion, bool]:
        """Return the version for ``manifest``, calling ``produce`` only if it does not exist yet.

        Returns (version, reused). ``produce`` returns (arrays, stats); if it raises, nothing is left.
        """
        existing = self.get(manifest)
        if existing is not None:
            logger.info("dataset %s already built: reusing it", manifest.version)
            return existing, True
        self._remove_stale_temps()
        arrays, stats = produce()
        return self.write(manifest, arrays, stats), False

    def write(self, manifest: DatasetManifest, arrays: dict[str, np.ndarray], stats: dict[str, Any]) -> DatasetVersion:
        """Write a version atomically (temp dir, fsync, rename); an existing one is left untouched."""
        n = check_arrays(arrays)
        final = self.path(manifest)
        tmp = self.root / f"{_TMP_PREFIX}{manifest.digest[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            with open(tmp / "arrays.npz", "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            _write_json(tmp / "stats.json", {**stats, "samples": n})
            _write_json(tmp / "manifest.json", manifest.to_dict())  # last: its presence marks completeness
            dir_fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / "manifest.json").is_file():  # not a concurrent identical build: real failure
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("dataset %s written: %d samples", manifest.version, n)
        return self._open(final)

    def _remove_stale_temps(self) -> None:
        for p in self.root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- building the arrays with Ray Data

_OBS = ("kinematics", "lidar", "grid")
_LIGHT = ("segment", "frame_index", "scenario", "bin_key", "is_event", "part_event", "part_ttc", "part_confidence",
          "part_disagreement", "nominal", "accel_err", "steer_err", "event_ahead", "hazard")


def _segment_rows(group: Any, *, meta: dict[str, tuple[str, str]], mining: dict[str, Any], labeler: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray map over one segment's messages (all topics): decode ticks, score, label; one row per frame."""
    from driveloop.cloud.labeling import LabelerConfig, accuracy_parts, label_segment
    from driveloop.cloud.mining import MiningConfig, frames_from_ticks, score_frames
    from driveloop.edge.segment import TICK_TOPICS, decode_tick

    path = str(Path(group.column("path")[0].as_py()).resolve())
    sha, scenario = meta[path]
    by_topic: dict[str, list[tuple[int, dict[str, Any]]]] = {t: [] for t in TICK_TOPICS}
    for topic, data in zip(group.column("topic").to_pylist(), group.column("data").to_pylist()):
        if topic in by_topic:
            by_topic[topic].append((int(data["tick"]), data))
    for rows in by_topic.values():
        rows.sort(key=lambda r: r[0])
    ticks = [decode_tick({t: by_topic[t][i][1] for t in TICK_TOPICS}) for i in range(len(by_topic[TICK_TOPICS[0]]))]
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


def _keep_selected(batch: dict[str, np.ndarray], *, hard: dict[str, list[int]], replay: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Ray map: keep the selected frames and tag each as hard or replay."""
    seg, idx = batch["segment"], batch["frame_index"]
    hard_sets = {k: set(v) for k, v in hard.items()}
    replay_sets = {k: set(v) for k, v in replay.items()}
    is_hard = np.array([int(i) in hard_sets.get(s, ()) for s, i in zip(seg, idx)], dtype=bool)
    is_replay = np.array([int(i) in replay_sets.get(s, ()) for s, i in zip(seg, idx)], dtype=bool)
    keep = is_hard | is_replay
    out = {k: batch[k][keep] for k in ("segment", "frame_index", "target_action", "hazard", "time_to_hazard_s", *_OBS)}
    out["hard"] = is_hard[keep]
    return out


def build_arrays_with_ray(
    segments: list[tuple[Path, str, str]],
    mining: Any,
    labeler: Any,
    seed: int,
    data_cpus: float,
    on_step: Any = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Ray Data over validated segment files: read_mcap -> per-segment score+label -> select -> arrays.

    ``segments``: (path, sha256, scenario) of files that passed ``validate_segment`` (one damaged file
    would abort the whole Ray dataset). The caller has started Ray. Returns (arrays, stats).
    """
    import ray

    from driveloop.cloud.labeling import summarize_accuracy
    from driveloop.cloud.mining import FrameScores, bin_counts, finish_scores, rank_segments, select_frames

    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def step(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 3)
        clock[0] = now
        if callable(on_step):
            on_step(name)

    meta = {str(Path(p).resolve()): (sha, scenario) for p, sha, scenario in segments}
    order = {sha: i for i, sha in enumerate(sorted(sha for _, sha, _ in segments))}
    pool = ray.data.TaskPoolStrategy(size=max(1, int(data_cpus)))
    try:
        raw = ray.data.read_mcap([str(Path(p).resolve()) for p, _, _ in segments], include_paths=True,
                                 include_metadata=False, override_num_blocks=len(segments))
        frames_ds = raw.groupby("path").map_groups(
            _segment_rows, batch_format="pyarrow", compute=pool,
            fn_kwargs={"meta": meta, "mining": asdict(mining), "labeler": asdict(labeler)},
        ).materialize()
        step("mine+label")
        light = frames_ds.select_columns(list(_LIGHT)).to_pandas()
    except Exception as e:  # Ray wraps worker failures in its own error types
        raise PipelineError(f"Ray Data mine/label stage failed: {e}") from e
    if light.empty:
        raise PipelineError("the segments hold no frames")
    raw_scores = []
    for sha, g in light.groupby("segment", sort=True):
        g = g.sort_values("frame_index")
        parts = {k: g[f"part_{k}"].to_numpy(np.float64) for k in ("event", "ttc", "confidence", "disagreement")}
        raw_scores.append(FrameScores(str(sha), parts, g["bin_key"].astype(str).tolist(), g["is_event"].to_numpy(bool)))
    counts = bin_counts(raw_scores)
    finished = [finish_scores(s, counts, mining) for s in raw_scores]
    selection = select_frames(finished, mining, seed)
    step("select")
    accuracy = summarize_accuracy({k: light[k].to_numpy() for k in ("nominal", "accel_err", "steer_err", "event_ahead", "hazard")}, labeler)
    if selection.n_hard + selection.n_replay == 0:
        raise PipelineError("mining selected no frames")
    try:
        chosen = frames_ds.map_batches(
            _keep_selected, batch_format="numpy", compute=pool,
            fn_kwargs={"hard": {k: v.tolist() for k, v in selection.hard.items()},
                       "replay": {k: v.tolist() for k, v in selection.replay.items()}},
        )
        batches = list(chosen.iter_batches(batch_format="numpy", batch_size=None))
    except Exception as e:
        raise PipelineError(f"Ray Data selection stage failed: {e}") from e
    batches = [b for b in batches if len(b["segment"])]
    cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    # A stable sample order (segment, frame) so the same inputs give byte-identical arrays.
    seg_index = np.array([order[s] for s in cat["segment"]], dtype=np.int64)
    sort = np.lexsort((cat["frame_index"], seg_index))
    arrays = {
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
    step("materialize")
    stats = {"frames": int(len(light)), "hard": selection.n_hard, "replay": selection.n_replay,
             "segments": len(segments), "labeler": accuracy.as_dict(), "timings_s": timings,
             "top_segments": [{"sha256": sha, "mean_score": round(v, 4)} for sha, v in rank_segments(finished)],
             "events_by_scenario": {str(k): int(v) for k, v in light.groupby("scenario")["is_event"].sum().items()}}
    return arrays, stats
