"""The demo report's figures (PNG, matplotlib Agg): each has a title, axis labels with units, and is drawn only
when it has something to show (no empty charts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STAGE_ORDER = ("shadow", "canary", "50%", "100%")
FAMILIAR = "familiar mix"
_SHIFT_MARKS = (("shift", "the world changes", "#7f8c8d"), ("detected", "campaign opened", "#e67e22"),
                ("validated", "candidate validated", "#2980b9"), ("adapted", "100 % of the fleet on it", "#27ae60"))


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def iteration_bars(out: Path, iterations: list[dict[str, Any]]) -> dict[str, Path]:
    """Interventions per hour and progress per iteration; collisions only when there were any."""
    plt = _plt()
    xs = [it["index"] for it in iterations]
    labels = [f"{it['index']}\nv{it['model']}" for it in iterations]
    charts = [("interventions_per_hour", "Fleet interventions per hour", "interventions / h", "#c0392b"),
              ("progress", "Progress (distance driven / distance at set speed)", "progress (ratio, 1 = set speed)",
               "#27ae60")]
    if any(it["collisions"] for it in iterations):
        charts.append(("collisions", "Collisions", "collisions (count)", "#2c3e50"))
    paths = {}
    for key, title, unit, colour in charts:
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        ax.bar(xs, [it[key] for it in iterations], color=colour)
        ax.set_xticks(xs, labels)
        ax.set_xlabel("iteration (model the fleet drove)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        paths[key] = _save(fig, out / f"{key}.png")
    return paths


def rollout_steps(out: Path, iterations: list[dict[str, Any]]) -> Path | None:
    """The stage each rollout was in after each health window (None when nothing was rolled out)."""
    rolled = [it for it in iterations if it.get("rollout_timeline")]
    if not rolled:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    for it in rolled:
        ys = [STAGE_ORDER.index(w["stage"]) if w["stage"] in STAGE_ORDER else -1 for w in it["rollout_timeline"]]
        ax.step(range(1, len(ys) + 1), ys, where="post", label=f"iteration {it['index']}: v{it['candidate']} "
                f"({it['rollout_outcome']})")
    ax.set_yticks(range(len(STAGE_ORDER)), STAGE_ORDER)
    ax.set_xlabel("health window (count; one window = every vehicle drives once)")
    ax.set_ylabel("rollout stage (share of the fleet)")
    ax.set_title("Staged rollouts")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "rollout_timeline.png")


def _per_class_series(windows: list[dict[str, Any]], environment: str | None) -> dict[str, list[tuple[float, float]]]:
    """(wall minutes at the window's end, interventions/h) per line: the new environment, and the familiar
    classes together (each alone is a few episodes a window)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for w in windows:
        groups: dict[str, list[float]] = {}
        for cls, row in w["classes"].items():
            key = cls if cls == environment else FAMILIAR
            acc = groups.setdefault(key, [0.0, 0.0])
            acc[0] += row["hours"]
            acc[1] += row["interventions"]
        for key, (hours, n) in groups.items():
            if hours > 0:
                series.setdefault(key, []).append((w["wall_end_s"] / 60.0, n / hours))
    return series


def adaptation_timeline(out: Path, windows: list[dict[str, Any]], shift: dict[str, Any] | None) -> Path | None:
    """Interventions per hour per class over wall-clock time, with the shift's stages marked."""
    if not windows:
        return None
    plt = _plt()
    env = (shift or {}).get("environment")
    fig, ax = plt.subplots(figsize=(9, 3.8), dpi=100)
    for key, points in sorted(_per_class_series(windows, env).items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", ms=3, lw=1.5, label=f"{key} (new)" if key == env else key,
                color="#c0392b" if key == env else "#34495e")
    if shift and shift.get("shift_at_s") is not None:
        t0 = float(shift["shift_at_s"])
        stamps = {"shift": 0.0, **{k: shift.get(f"{k}_after_s") for k in ("detected", "validated", "adapted")}}
        for key, label, colour in _SHIFT_MARKS:
            if stamps.get(key) is not None:
                ax.axvline((t0 + float(stamps[key])) / 60.0, color=colour, ls="--", lw=1.2, label=label)
    ax.set_xlabel("wall-clock time since the demo started (min)")
    ax.set_ylabel("interventions / h (per drive window)")
    ax.set_title("Adaptation timeline: fallback interventions per hour by scenario class")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    return _save(fig, out / "adaptation_timeline.png")


def federated_rounds(out: Path, iterations: list[dict[str, Any]]) -> Path | None:
    """Per federated round: updates accepted and the round's wall time, one line per iteration's run."""
    runs = [(it["index"], it["federated"].get("round_log") or []) for it in iterations if it.get("federated")]
    runs = [(i, log) for i, log in runs if log]
    if not runs:
        return None
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2), dpi=100)
    for i, log in runs:
        rounds = [r["round"] for r in log]
        left.plot(rounds, [r["accepted"] for r in log], lw=1.2, label=f"iteration {i}")
        right.plot(rounds, [r["wall_s"] for r in log], lw=1.2, label=f"iteration {i}")
    left.set_xlabel("federated round (count)")
    left.set_ylabel("updates accepted (vehicles)")
    left.set_title("Federated rounds: accepted updates")
    right.set_xlabel("federated round (count)")
    right.set_ylabel("round wall time (s)")
    right.set_title("Federated rounds: duration")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "federated_rounds.png")
