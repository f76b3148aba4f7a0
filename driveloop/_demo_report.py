"""The demo's report: one self-contained HTML page (figures inlined as PNG, no external assets) that a person
wants to read — sentences and tables in words and units, never a Python dict; figures from ``_demo_plots``.

Sections: what happened (iterations), the shift and how fast the fleet adapted, the adaptation timeline, the
per-class gate verdict of every candidate (baseline vs candidate), federated rounds, time per stage, and
where to look further (the fleet dashboard, ``driveloop models lineage``).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from driveloop._demo_plots import adaptation_timeline, federated_rounds, iteration_bars, rollout_steps

_CHECK_WORDS = {"collisions_zero": "collided", "interventions_fall": "interventions did not fall",
                "interventions_kept": "more interventions than before", "progress_kept": "progress fell",
                "comfort_kept": "less comfortable (jerk)"}
_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.2em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f6f8}td.l,th.l{text-align:left}.ok{color:#1e8449}.bad{color:#c0392b;font-weight:600}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
code{background:#f4f6f8;padding:1px 4px}.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{flex:1 1 45%}"""


def _e(value: object) -> str:
    return html.escape(str(value))


def fleet_words(versions: dict[str, int]) -> str:
    """``{'2': 8}`` as a person says it: ``8 vehicles on v2``."""
    if not versions:
        return "—"
    return ", ".join(f"{n} vehicle{'s' if n != 1 else ''} on v{v}" for v, n in sorted(versions.items(), key=lambda kv: -kv[1]))


def _num(value: float | None, fmt: str = ".1f", unit: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{unit}"


def _img(path: Path | None, caption: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _iterations_table(iterations: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{it['index']}</td><td class=l>{_e(it['kind'])}</td><td class=l>{_e(_world(it.get('world', 'mix')))}</td>"
        f"<td>v{_e(it['model'])}</td><td>{it['interventions_per_hour']:.1f}</td><td>{it['collisions']}</td>"
        f"<td>{it['progress']:.3f}</td><td>{it['distance_km']:.1f}</td>"
        f"<td>{'v' + _e(it['candidate']) if it.get('candidate') else '—'}</td><td class=l>{_e(it['rollout_outcome'])}</td>"
        f"<td class=l>{_e(fleet_words(it.get('fleet_versions_after') or {}))}</td></tr>" for it in iterations)
    return ("<table><tr><th>iteration</th><th class=l>kind</th><th class=l>world</th><th>fleet model</th>"
            "<th>interventions / h</th><th>collisions</th><th>progress</th><th>distance (km)</th><th>candidate</th>"
            f"<th class=l>rollout</th><th class=l>fleet afterwards</th></tr>{rows}</table>")


def _world(world: str) -> str:
    return "familiar mix" if world == "mix" else f"familiar mix + {world.split('+', 1)[1]}"


def _final_sentence(final: dict[str, Any]) -> str:
    if not final:
        return ""
    return (f"<p>After the last iteration the fleet ({_e(fleet_words(final.get('versions', {})))}) drove the same "
            f"routes again in the {_e(_world(final.get('world', 'mix')))}: "
            f"<b>{final['interventions_per_hour']:.1f} interventions per hour</b>, {final['collisions']} collisions, "
            f"progress {final['progress']:.3f} over {final['distance_km']:.1f} km.</p>")


def _shift_section(shift: dict[str, Any] | None) -> str:
    if not shift:
        return ""
    env = shift["environment"]
    before, after = shift.get("classes_before") or {}, shift.get("classes_after") or {}
    stages = [("the world gains " + env, 0.0), ("shift detected, campaign opened", shift.get("detected_after_s")),
              ("candidate validated by the gate", shift.get("validated_after_s")),
              ("100 % of the fleet on it", shift.get("adapted_after_s"))]
    stage_rows = "".join(f"<tr><td class=l>{_e(n)}</td><td>{_num(t, '.0f', ' s')}</td>"
                         f"<td>{_num(None if t is None else t / 60.0, '.1f', ' min')}</td></tr>" for n, t in stages)
    campaign = shift.get("campaign_id")
    approval = "auto-approved by the operator's policy" if shift.get("campaign_approved") else "waiting for approval"
    alert = shift.get("alert") or {}
    rows = ""
    for cls in sorted(set(before) | set(after), key=lambda c: (c != env, c)):
        b, a = before.get(cls, {}), after.get(cls, {})
        rows += (f"<tr><td class=l>{_e(cls)}{' (new)' if cls == env else ''}</td><td>{_num(b.get('hours', 0) * 60, '.1f')}</td>"
                 f"<td>{_num(b.get('per_hour'))}</td><td>{_num(a.get('hours', 0) * 60, '.1f')}</td>"
                 f"<td>{_num(a.get('per_hour'))}</td><td>{b.get('collisions', 0) + a.get('collisions', 0)}</td></tr>")
    verdict = ("<span class=ok>no old class worse than the gate allows</span>" if shift.get("old_classes_ok")
               else "<span class=bad>an old class got worse, or no candidate was gated</span>")
    return f"""<h2>The shift: {_e(env)}</h2>
<p>After iteration {_e(shift.get('shift_after', 1))} the fleet's world gained <b>{_e(env)}</b>, an environment the
bootstrap model never saw. The shift detector compared per-class intervention rates with the fleet's baseline
({_num(shift.get('baseline_per_hour'))} interventions/h) and saw {_e(env)} at {_num(alert.get('per_hour'))}/h, above its
threshold of {_num(alert.get('threshold_per_hour'))}/h: it opened campaign <code>{_e(campaign or '—')}</code>
({_e(approval)}). {_e(env)} interventions per hour: <b>{_num(shift.get('before_per_hour'))} before →
{_num(shift.get('after_per_hour'))} after</b> one adaptation; {verdict}.</p>
<table><tr><th class=l>stage</th><th>after the shift</th><th></th></tr>{stage_rows}</table>
<table><tr><th class=l>scenario class</th><th>driven before (min)</th><th>interventions / h before</th>
<th>driven after (min)</th><th>interventions / h after</th><th>collisions</th></tr>{rows}</table>"""


def _gate_table(title: str, gate: dict[str, Any]) -> str:
    classes = gate.get("classes") or {}
    if not classes:
        return ""
    rows = ""
    for cls, v in classes.items():
        b, c = v["baseline"], v["candidate"]
        failed = [_CHECK_WORDS.get(k, k) for k, ok in v["checks"].items() if not ok]
        verdict = "<span class=ok>pass</span>" if v["passed"] else f"<span class=bad>fail: {_e('; '.join(failed))}</span>"
        rows += (f"<tr><td class=l>{_e(cls)}</td><td>{b['interventions_per_hour']:.1f}</td>"
                 f"<td>{c['interventions_per_hour']:.1f}</td><td>{c['collisions']}</td><td>{b['progress']:.3f}</td>"
                 f"<td>{c['progress']:.3f}</td><td>{b['jerk_mps3']:.2f}</td><td>{c['jerk_mps3']:.2f}</td>"
                 f"<td class=l>{verdict}</td></tr>")
    overall = "passed" if gate.get("passed") else "failed"
    return (f"<h3>{_e(title)}: gate {overall}</h3><table><tr><th class=l>class</th><th>interventions / h before</th>"
            "<th>after</th><th>collisions</th><th>progress before</th><th>after</th><th>mean |jerk| before (m/s³)</th>"
            f"<th>after (m/s³)</th><th class=l>verdict</th></tr>{rows}</table>")


def _gates_section(iterations: list[dict[str, Any]]) -> str:
    parts = []
    for it in iterations:
        for side, name in (("pipeline", "cloud pipeline"), ("federated", "federated run")):
            d = it.get(side) or {}
            if d.get("candidate") is not None and d.get("gate"):
                parts.append(_gate_table(f"Iteration {it['index']}, {name} candidate v{d['candidate']} "
                                         f"vs v{it['model']}", d["gate"]))
    if not parts:
        return ""
    return ("<h2>Held-out gate, per scenario class</h2><p>Each candidate drove the held-out scenarios (seeds never "
            "used for training) beside the model it would replace; each class is judged on its own.</p>" + "".join(parts))


def _stages_section(iterations: list[dict[str, Any]], seconds: float | None) -> str:
    rows = ""
    for it in iterations:
        timings = (it.get("pipeline") or {}).get("timings_s") or {}
        for stage, s in timings.items():
            if "." not in stage:
                rows += f"<tr><td>{it['index']}</td><td class=l>pipeline: {_e(stage)}</td><td>{s:.1f}</td></tr>"
        windows = len(it.get("rollout_timeline") or [])
        if windows:
            rows += f"<tr><td>{it['index']}</td><td class=l>rollout</td><td>{windows} health windows</td></tr>"
    if not rows:
        return ""
    return (f"<h2>Time per stage</h2><table><tr><th>iteration</th><th class=l>stage</th><th>wall time (s)</th></tr>"
            f"{rows}</table><p>Whole demo: {_num(seconds, '.0f', ' s')}.</p>")


def _links(report: dict[str, Any]) -> str:
    versions = sorted({int(it["candidate"]) for it in report["iterations"] if it.get("candidate")})
    lineage = "".join(f"<li><code>driveloop models lineage {v}</code></li>" for v in versions)
    dash = report.get("dashboard")
    dash_html = (f'<a href="{_e(dash)}/">{_e(dash)}/</a> (served while the demo ran; <code>driveloop ota serve</code> '
                 "serves it again)" if dash and str(dash).startswith("http") else "served while the demo ran")
    return (f"<h2>Look further</h2><ul><li>Fleet dashboard: {dash_html}</li>{lineage}"
            f"<li>Everything above as JSON: <code>report.json</code> beside this page</li></ul>")


def write_report(out: Path, report: dict[str, Any]) -> Path:
    """Write ``index.html`` plus the PNGs it inlines into ``out``; returns the HTML path (written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    iterations = report["iterations"]
    shift = report.get("shift")
    bars = iteration_bars(out, iterations)
    figures = "".join([
        _img(adaptation_timeline(out, report.get("timeline") or [], shift),
             "Interventions per hour of each drive window (data drives and rollout windows) over wall-clock time."),
        '<div class="grid">',
        _img(bars.get("interventions_per_hour"), "Fleet interventions per hour in each iteration's data drive."),
        _img(bars.get("progress"), "Progress: distance driven over the distance at the set speed."),
        _img(bars.get("collisions"), "Collisions per iteration."),
        _img(rollout_steps(out, iterations), "Stage of each staged rollout after each health window."),
        "</div>",
    ])
    collisions = sum(it["collisions"] for it in iterations) + int((report.get("final_drive") or {}).get("collisions", 0))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>driveloop demo report</title>
<style>{_STYLE}</style></head><body><h1>driveloop demo</h1>
<p>Each iteration: the fleet drives its seeded routes on the model it was given, records and uploads; the cloud
pipeline and a federated run produce candidates, gated on held-out scenarios; the better validated one is signed
and rolled out in stages (shadow, canary, 50 %, 100 %) with live health gates. {collisions} collisions in all.</p>
{_iterations_table(iterations)}{_final_sentence(report.get('final_drive') or {})}
{_shift_section(shift)}{figures}{_gates_section(iterations)}
{_img(federated_rounds(out, iterations), "Federated rounds: updates accepted and wall time per round.")}
{_stages_section(iterations, report.get('seconds'))}{_links(report)}</body></html>"""
    path = out / "index.html"
    tmp = out / ".index.html.part"
    tmp.write_text(page)
    tmp.replace(path)
    return path
