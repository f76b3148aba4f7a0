"""The demo's HTML report is for people: no Python dicts in the text, every figure titled and labelled with units,
no chart of nothing (collisions only when there were some), the shift's time-to-adapt and per-class gate tables;
and it renders in a real headless Chromium (screenshot in the test's temp folder)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.ota.test_dashboard_browser import chromium, needs_chromium, screenshot


def _gate(passed: bool, classes: dict[str, tuple[float, float, bool]]) -> dict[str, Any]:
    def metrics(iph: float) -> dict[str, float]:
        return {"episodes": 3, "hours": 0.05, "collisions": 0, "interventions": iph * 0.05,
                "interventions_per_hour": iph, "progress": 0.8, "jerk_mps3": 0.4}

    return {"passed": passed, "reasons": [], "classes": {
        c: {"passed": ok, "checks": {"collisions_zero": True, "interventions_fall": ok, "progress_kept": True,
                                     "comfort_kept": True},
            "baseline": metrics(b), "candidate": metrics(a)} for c, (b, a, ok) in classes.items()}}


def _iteration(index: int, model: str, world: str, candidate: int | None, collisions: int = 0) -> dict[str, Any]:
    gate = _gate(True, {"ccrs": (100.0, 80.0, True), "slippery": (300.0, 120.0, True)})
    return {"index": index, "model": model, "interventions_per_hour": 40.0 / index, "collisions": collisions,
            "progress": 0.83, "distance_km": 41.0, "segments": 100, "kind": "loop", "world": world,
            "candidate": candidate, "rollout_outcome": "completed" if candidate else "no-candidate",
            "rollout_timeline": [{"window": 1, "stage": "shadow"}, {"window": 2, "stage": "canary"},
                                 {"window": 3, "stage": "100%"}] if candidate else [],
            "fleet_versions_after": {str(candidate or model): 8},
            "classes": {"slippery": {"hours": 0.05, "interventions": 15, "collisions": 0, "per_hour": 300.0},
                        "highway": {"hours": 0.2, "interventions": 0, "collisions": 0, "per_hour": 0.0}},
            "pipeline": {"candidate": candidate, "candidate_stage": "validated", "gate": gate,
                         "timings_s": {"dataset": 70.0, "dataset.select": 5.0, "train": 90.0, "evaluate": 20.0}},
            "federated": {"candidate": None, "gate": {},
                          "round_log": [{"round": r, "accepted": 8, "wall_s": 0.4 + r / 100} for r in range(1, 21)]}}


def _report(collisions: int = 0) -> dict[str, Any]:
    windows = [{"label": f"w{i}", "fleet_t_s": 60.0 * i, "duration_s": 60.0, "world": "shifted" if i > 2 else "familiar",
                "wall_end_s": 30.0 * i, "classes": {
                    "highway": {"hours": 0.1, "interventions": 1, "collisions": 0, "per_hour": 10.0},
                    **({"slippery": {"hours": 0.03, "interventions": 9 - i, "collisions": 0,
                                     "per_hour": (9 - i) / 0.03}} if i > 2 else {})}} for i in range(1, 8)]
    shift = {"environment": "slippery", "detected_after_s": 31.0, "campaign_id": "cmp-0123456789ab",
             "campaign_approved": True, "validated_after_s": 95.0, "adapted_after_s": 160.0, "before_per_hour": 300.0,
             "after_per_hour": 90.0, "old_classes_ok": True, "shift_at_s": 60.0, "shift_after": 1,
             "alert": {"per_hour": 360.0, "threshold_per_hour": 20.0}, "baseline_per_hour": 2.0,
             "classes_before": {"slippery": {"hours": 0.05, "per_hour": 300.0, "collisions": 0},
                                "highway": {"hours": 0.2, "per_hour": 0.0, "collisions": 0}},
             "classes_after": {"slippery": {"hours": 0.05, "per_hour": 90.0, "collisions": 0},
                               "highway": {"hours": 0.2, "per_hour": 0.0, "collisions": 0}}}
    return {"iterations": [_iteration(1, "1", "mix", 2), _iteration(2, "2", "mix+slippery", 4, collisions)],
            "final_drive": {"interventions_per_hour": 3.8, "collisions": 0, "progress": 0.84, "distance_km": 41.2,
                            "segments": 100, "versions": {"4": 8}, "world": "mix+slippery"},
            "dashboard": "http://127.0.0.1:8700", "seconds": 400.0, "timeline": windows, "shift": shift}


def _text(page: str) -> str:
    body = re.sub(r'src="data:image/png;base64,[^"]*"', "", page)
    body = re.sub(r"<style>.*?</style>", "", body, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", body).split())


def test_report_reads_as_words_not_dicts(tmp_path: Path) -> None:
    from driveloop._demo_report import write_report

    page = write_report(tmp_path, _report()).read_text()
    text = _text(page)
    assert not re.search(r"\{['\"]", text) and "{'" not in page, "a Python dict leaked into the report"
    assert "8 vehicles on v4" in text and "8 vehicles on v2" in text
    for want in ("The shift: slippery", "300.0 before → 90.0 after", "cmp-0123456789ab", "auto-approved",
                 "no old class worse than the gate allows", "100 % of the fleet on it", "160 s",
                 "Held-out gate, per scenario class", "driveloop models lineage 4", "http://127.0.0.1:8700/",
                 "pipeline: train"):
        assert want in text, want
    assert "dataset.select" not in text  # sub-steps stay in the JSON, the table shows stages


def test_figures_are_labelled_with_units_and_none_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from driveloop import _demo_plots
    from driveloop._demo_report import write_report

    saved: dict[str, Any] = {}
    real_save = _demo_plots._save

    def keep(fig: Any, path: Path) -> Path:
        saved[path.name] = [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), len(ax.lines) + len(ax.patches))
                            for ax in fig.axes]
        return real_save(fig, path)

    monkeypatch.setattr(_demo_plots, "_save", keep)
    write_report(tmp_path, _report())
    assert set(saved) == {"adaptation_timeline.png", "interventions_per_hour.png", "progress.png",
                          "rollout_timeline.png", "federated_rounds.png"}  # no collisions chart: there were none
    for name, axes in saved.items():
        for title, xlabel, ylabel, drawn in axes:
            assert title and drawn > 0, name
            for label in (xlabel, ylabel):  # a unit in brackets, or a rate per hour
                assert re.search(r"\([^)]+\)", label) or "/ h" in label, (name, label)
    timeline = saved["adaptation_timeline.png"][0]
    assert "(min)" in timeline[1] and "interventions / h" in timeline[2]
    saved.clear()
    write_report(tmp_path / "with-collisions", _report(collisions=1))
    assert "collisions.png" in saved


@needs_chromium
def test_report_renders_in_chromium(tmp_path: Path) -> None:
    from driveloop._demo_report import write_report

    page = write_report(tmp_path / "report", _report())
    shot = tmp_path / "report.png"
    screenshot(tmp_path, page.as_uri(), shot)
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0
    assert dom.stdout.count("<img") == 5 and "The shift: slippery" in dom.stdout
