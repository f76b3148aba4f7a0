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
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from driveloop.core.atomic import fsync_dir
from driveloop.contracts.observation import GRID_CHANNELS, GRID_H, GRID_W, KIN_DIM, LIDAR_CELLS
from driveloop.core.exceptions import PipelineError, StorageError

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


def code_version(modules: tuple[str, ...] = ("mining", "labeling", "datasets", "_dataset_build")) -> str:
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
                np.savez(f, **arrays)  # type: ignore[arg-type]
                f.flush()
                os.fsync(f.fileno())
            _write_json(tmp / "stats.json", {**stats, "samples": n})
            _write_json(tmp / "manifest.json", manifest.to_dict())  # last: its presence marks completeness
            fsync_dir(tmp)
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
