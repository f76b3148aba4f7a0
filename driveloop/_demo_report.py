"""The demo's report: PNG plots per iteration and one self-contained HTML page (no external assets)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

_STAGE_ORDER = ("shadow", "canary", "50%", "100%")


def _plots(out: Path, iterations: list[dict[str, Any]]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [it["index"] for it in iterations]
    labels = [f"{it['index']}\nv{it['model']}" for it in iterations]
    paths: dict[str, Path] = {}
    for key, title, colour in (("interventions_per_hour", "Fallback interventions per hour", "#c0392b"),
                               ("collisions", "Collisions", "#2c3e50"), ("progress", "Progress (distance / set-speed distance)", "#27ae60")):
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        ax.bar(xs, [it[key] for it in iterations], color=colour)
        ax.set_xticks(xs, labels)
        ax.set_xlabel("iteration (model the fleet drove)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        paths[key] = out / f"{key}.png"
        fig.savefig(paths[key])
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    for it in iterations:
        tl = it.get("rollout_timeline") or []
        ys = [_STAGE_ORDER.index(w["stage"]) if w["stage"] in _STAGE_ORDER else -1 for w in tl]
        if ys:
            ax.step(range(1, len(ys) + 1), ys, where="post", label=f"it {it['index']}: v{it['candidate']} "
                    f"({it['rollout_outcome']})")
    ax.set_yticks(range(len(_STAGE_ORDER)), _STAGE_ORDER)
    ax.set_xlabel("health window")
    ax.set_title("Rollout timeline")
    if ax.get_lines():
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["rollout"] = out / "rollout_timeline.png"
    fig.savefig(paths["rollout"])
    plt.close(fig)
    return paths


def write_report(out: Path, report: dict[str, Any]) -> Path:
    """Write ``index.html`` plus PNGs into ``out``; returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    iterations = report["iterations"]
    plots = _plots(out, iterations)
    rows = "".join(
        f"<tr><td>{it['index']}</td><td>{html.escape(it['kind'])}</td><td>v{it['model']}</td>"
        f"<td>{it['interventions_per_hour']:.1f}</td><td>{it['collisions']}</td><td>{it['progress']:.3f}</td>"
        f"<td>{'v' + str(it['candidate']) if it['candidate'] else '—'}</td>"
        f"<td>{html.escape(it['rollout_outcome'])}</td><td>{html.escape(str(it['fleet_versions_after']))}</td></tr>"
        for it in iterations)
    imgs = "".join(
        f'<img alt="{k}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for k, p in plots.items())
    final = report.get("final_drive", {})
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>driveloop demo report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:48%;margin:4px}}</style></head>
<body><h1>driveloop demo</h1>
<p>Each iteration: the fleet drives its seeded routes on the model it was given, records and uploads;
the cloud pipeline and a federated round produce gated candidates; the better one is signed and rolled
out in stages with live health gates.</p>
<table><tr><th>iteration</th><th>kind</th><th>fleet model</th><th>interventions/h</th><th>collisions</th>
<th>progress</th><th>candidate</th><th>rollout</th><th>fleet after</th></tr>{rows}</table>
<p>After the last iteration the fleet drove again: {html.escape(str(final))}</p>
{imgs}<p>Total time: {report.get('seconds')} s.</p></body></html>"""
    path = out / "index.html"
    tmp = out / ".index.html.part"
    tmp.write_text(page)
    tmp.replace(path)
    return path
