"""`driveloop cloud pipeline run`: exit codes and JSON on the paths that need no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driveloop.cli import main


def test_nothing_new_reports_so_in_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path))
    (tmp_path / "cloud").mkdir()
    assert main(["cloud", "pipeline", "run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "no_new_segments" and out["segments_new"] == 0 and out["candidate"] is None
    assert "discover" in out["timings_s"]


def test_bad_flag_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path))
    assert main(["cloud", "pipeline", "run", "--min-reduction", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("driveloop: error:") and "--min-reduction" in err


def test_missing_object_is_reported_then_a_pipeline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from driveloop.cloud.catalog import Catalog, SegmentRecord
    from driveloop.contracts.segment import SegmentMeta

    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path))
    (tmp_path / "cloud").mkdir()
    cat = Catalog(f"sqlite:///{(tmp_path / 'cloud' / 'catalog.db').resolve()}")
    meta = SegmentMeta(vehicle="v1", scenario="highway", seed=1, model_version="1", start_s=0.0, end_s=1.0,
                       n_ticks=10, events={}, has_event=False, priority=0, recorded_at_unix_s=0.0)
    cat.add_segment(SegmentRecord(sha256="a" * 64, meta=meta, size=10, ingested_at_s=time.time()))
    cat.close()
    # the catalogued object is missing from the store: reported, skipped, then a clear error
    assert main(["cloud", "pipeline", "run"]) == 7
    err = capsys.readouterr().err
    assert "none of the 1 new segments is valid" in err
