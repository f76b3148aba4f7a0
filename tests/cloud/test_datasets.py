"""Dataset versions: digest determinism, reuse by digest, atomic writes (no partial version)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from driveloop.cloud.datasets import ARRAY_SPECS, DatasetManifest, DatasetStore, check_arrays, code_version
from driveloop.core.exceptions import PipelineError, StorageError


def _manifest(**changes: object) -> DatasetManifest:
    base = DatasetManifest(
        segments=("b" * 64, "a" * 64), label_version="hindsight-idm-1", code_version=code_version(),
        base_model_version=1, selection={"top_k": 100, "seed": 0},
    )
    return dataclasses.replace(base, **changes)


def _arrays(n: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype) in ARRAY_SPECS.items():
        if dtype == "bool":
            out[name] = rng.random((n, *shape)) > 0.5
        elif dtype == "int64":
            out[name] = rng.integers(0, 10, size=(n, *shape)).astype(np.int64)
        else:
            out[name] = rng.standard_normal((n, *shape)).astype(np.float32)
    return out


def test_digest_is_deterministic_and_order_free() -> None:
    a = _manifest()
    b = _manifest(segments=("a" * 64, "b" * 64, "a" * 64))
    assert a.segments == ("a" * 64, "b" * 64)
    assert a.digest == b.digest and a.version == b.version
    assert DatasetManifest.from_dict(a.to_dict()).digest == a.digest


@pytest.mark.parametrize(
    "change",
    [{"segments": ("c" * 64,)}, {"label_version": "x"}, {"code_version": "0" * 16}, {"base_model_version": 2},
     {"selection": {"top_k": 101, "seed": 0}}],
)
def test_every_input_changes_the_digest(change: dict) -> None:
    assert _manifest(**change).digest != _manifest().digest


def test_code_version_tracks_the_sources() -> None:
    assert code_version() == code_version()
    assert code_version(("mining",)) != code_version(("labeling",))


def test_build_writes_once_then_reuses(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    calls = []

    def produce() -> tuple[dict[str, np.ndarray], dict]:
        calls.append(1)
        return _arrays(), {"hard": 3}

    v1, reused1 = store.build(_manifest(), produce)
    v2, reused2 = store.build(_manifest(), produce)
    assert (reused1, reused2) == (False, True) and len(calls) == 1
    assert v1.path == v2.path == tmp_path / _manifest().digest
    assert v2.samples == 5 and v2.stats["hard"] == 3
    got = v2.arrays()
    want = _arrays()
    assert all(np.array_equal(got[k], want[k]) for k in ARRAY_SPECS)
    assert store.open(v1.version).path == v1.path


def test_failed_stage_leaves_no_partial_version(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)

    def boom() -> tuple[dict[str, np.ndarray], dict]:
        raise PipelineError("labeling failed")

    with pytest.raises(PipelineError):
        store.build(_manifest(), boom)
    bad = _arrays()
    bad["grid"] = bad["grid"][:, :1]
    with pytest.raises(PipelineError, match="grid"):
        store.build(_manifest(), lambda: (bad, {}))
    assert list(tmp_path.iterdir()) == []
    assert store.get(_manifest()) is None


def test_stale_temp_dirs_are_removed_and_tampering_detected(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    (tmp_path / ".tmp-crashed").mkdir()
    v, _ = store.build(_manifest(), lambda: (_arrays(), {}))
    assert not (tmp_path / ".tmp-crashed").exists()
    other = tmp_path / ("f" * 64)
    v.path.rename(other)
    with pytest.raises(StorageError, match="does not match"):
        store.open("f" * 16)


def test_arrays_are_checked() -> None:
    a = _arrays()
    a["target_action"][0, 0] = np.nan
    with pytest.raises(PipelineError, match="finite"):
        check_arrays(a)
    with pytest.raises(PipelineError, match="expected"):
        check_arrays({"kinematics": a["kinematics"]})
    with pytest.raises(PipelineError, match="at least one segment"):
        _manifest(segments=())
