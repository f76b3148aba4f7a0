// driveloop rollout dashboard: polls /v1/dashboard every 2 s and draws with inline SVG (no libraries).
"use strict";
const REFRESH_MS = 2000;
const PALETTE = ["#2f6fde", "#d9822b", "#3a9b5c", "#8e5bd6", "#c94f7c", "#6b7385"];
const SVG_NS = "http://www.w3.org/2000/svg";
let current = null;

function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fillTable(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows.map(r => { const tr = el("tr"); r.forEach(c => tr.appendChild(el("td", {}, String(c)))); return tr; }));
}

function renderRollout(d) {
  const r = d.rollout;
  const status = document.getElementById("rollout-status");
  if (!r) { status.textContent = "no rollout"; status.className = "status"; return; }
  document.getElementById("rollout-title").textContent = `#${r.rollout_id}: ${r.previous_version} → ${r.version}`;
  status.textContent = `${r.status} · stage ${r.stage}`;
  status.className = `status ${r.status}`;
  const stages = document.getElementById("stages");
  stages.replaceChildren(...d.stages.map(s => {
    const cls = r.status === "aborted" && s.state === "current" ? "aborted" : s.state;
    return el("li", {class: cls, "data-stage": s.name}, `${s.name} (${Math.round(s.fraction * 100)}%${s.shadow ? ", shadow" : ""})`);
  }));
  const done = d.stages.filter(s => s.state === "done").length;
  document.getElementById("progress-bar").style.width = `${Math.round(100 * done / Math.max(1, d.stages.length))}%`;
  document.getElementById("rollout-reason").textContent = r.reason;
}

function renderShare(d) {
  const svg = document.getElementById("share-chart");
  const entries = Object.entries(d.fleet_versions).sort();
  const total = entries.reduce((a, [, n]) => a + n, 0) || 1;
  const bars = [];
  entries.forEach(([v, n], i) => {
    const y = 10 + i * 28, w = Math.max(1, 300 * n / total);
    bars.push(el("svg:rect", {x: 90, y, width: w, height: 20, fill: PALETTE[i % PALETTE.length]}));
    bars.push(el("svg:text", {x: 0, y: y + 15, "font-size": 12}, v));
    bars.push(el("svg:text", {x: 95 + w, y: y + 15, "font-size": 12, class: "share-count"}, `${n} (${Math.round(100 * n / total)}%)`));
  });
  svg.replaceChildren(...bars);
  fillTable("cohorts", Object.entries(d.cohort_sizes).sort().map(([c, n]) => [c, n]));
}

function lineChart(svg, series, metric, height, unit) {
  // one line per cohort; windows where a cohort had no vehicles are gaps, not zeros
  const parts = [el("svg:line", {x1: 30, y1: height - 20, x2: 410, y2: height - 20, stroke: "#b6bdca"})];
  if (series.length) {
    const vals = series.flatMap(p => ["canary", "control"].filter(c => p[c].vehicles > 0).map(c => p[c][metric]));
    const ymax = Math.max(1e-9, ...vals) * 1.1;
    const x = i => 30 + (series.length === 1 ? 190 : 380 * i / (series.length - 1));
    const y = v => height - 20 - (height - 35) * v / ymax;
    for (const [cohort, color] of [["control", "#2f6fde"], ["canary", "#d9822b"]]) {
      let run = [];
      const flush = () => {
        if (run.length) parts.push(el("svg:polyline", {points: run.join(" "), fill: "none", stroke: color,
          "stroke-width": 2, class: `series-${cohort}`, "data-metric": metric}));
        run = [];
      };
      series.forEach((p, i) => {
        if (p[cohort].vehicles > 0) run.push(`${x(i).toFixed(1)},${y(p[cohort][metric]).toFixed(1)}`); else flush();
      });
      flush();
    }
    let last = "";
    series.forEach((p, i) => {  // stage boundaries
      if (p.stage !== last) {
        parts.push(el("svg:line", {x1: x(i), y1: 12, x2: x(i), y2: height - 20, stroke: "#dfe3ea", "stroke-dasharray": "3 3"}));
        parts.push(el("svg:text", {x: x(i) + 2, y: height - 6, "font-size": 9, fill: "#6b7385"}, p.stage));
        last = p.stage;
      }
    });
    parts.push(el("svg:text", {x: 0, y: 12, "font-size": 10}, `${(ymax / 1.1).toFixed(1)} ${unit}`));
  }
  svg.replaceChildren(...parts);
}

function renderHealth(d) {
  lineChart(document.getElementById("health-chart"), d.series, "interventions_per_h", 170, "/h");
  lineChart(document.getElementById("p99-chart"), d.series, "p99_ms", 110, "ms");
  const s = d.series;
  if (s.length) {
    const last = s[s.length - 1];
    fillTable("health", [["canary", last.canary], ["control", last.control]].map(([n, c]) =>
      [n, c.vehicles, c.hours.toFixed(2), c.interventions_per_h.toFixed(2), c.p99_ms.toFixed(1), c.collisions]));
  }
}

function renderTimeline(d) {
  fillTable("timeline", d.timeline.map(t => [t.seq, t.at_s.toFixed(0), t.actor, t.action, t.stage, t.reason]));
  document.getElementById("audit").textContent = d.audit_ok ? "audit chain verified" : "AUDIT CHAIN BROKEN";
  const u = d.update_outcomes;
  document.getElementById("updates").textContent =
    `success ${u.success || 0} · failure ${u.failure || 0} · revert ${u.revert || 0}`;
  const versions = Object.keys(d.fleet_versions).length;
  document.getElementById("summary").textContent = `${d.vehicles} vehicles · ${versions} model versions`;
}

// The logs panel: the newest lines of the cloud's log index, filtered by search words, vehicle, rollout and
// level (the filters start from the page's URL: /?vehicle=veh003&level=warning&q=aeb).
const LOG_FILTERS = {q: "log-q", vehicle: "log-vehicle", rollout: "log-rollout", level: "log-level"};

function logParams() {
  const params = new URLSearchParams();
  for (const [name, id] of Object.entries(LOG_FILTERS)) {
    const v = document.getElementById(id).value.trim();
    if (v) params.set(name, v);
  }
  return params;
}

async function refreshLogs() {
  const count = document.getElementById("logs-count");
  const resp = await fetch(`/v1/logs?${logParams()}`, {cache: "no-store"});
  if (resp.status === 404) { document.getElementById("logs-card").hidden = true; return; }
  const body = await resp.json();
  if (!resp.ok) { count.textContent = `filter refused: ${body.error}`; return; }
  document.getElementById("logs-card").hidden = false;
  count.textContent = `${body.lines.length} newest`;
  const rows = body.lines.map(l => {
    const tr = el("tr", {class: `level-${l["log.level"]}`, "data-vehicle": l["vehicle.id"] || ""});
    [l["@timestamp"], l["log.level"], l["vehicle.id"] || "", l["model.version"] || "", l["event.action"] || "",
     l.message].forEach(c => tr.appendChild(el("td", {}, String(c))));
    return tr;
  });
  document.querySelector("#logs tbody").replaceChildren(...rows);
}

async function refresh() {
  try {
    const resp = await fetch("/v1/dashboard", {cache: "no-store"});
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    current = await resp.json();
    renderRollout(current); renderShare(current); renderHealth(current); renderTimeline(current);
    await refreshLogs();
  } catch (err) {
    document.getElementById("summary").textContent = `cannot reach the fleet server: ${err.message}`;
  }
}

async function act(action) {
  const out = document.getElementById("action-result");
  if (!current || !current.rollout) { out.textContent = "no rollout to act on"; return; }
  const token = document.getElementById("token").value;
  const resp = await fetch(`/v1/rollouts/${current.rollout.rollout_id}/${action}`, {
    method: "POST", headers: {"Authorization": `Bearer ${token}`, "Content-Type": "application/json"},
    body: JSON.stringify({reason: `${action} from the dashboard`}),
  });
  const body = await resp.json();
  out.textContent = resp.ok ? `${action}: ok (${body.status}, ${body.stage})` : `${action} refused: ${body.error}`;
  refresh();
}

// The live panel: each road as a strip, vehicles as marks at their x (fallback in red), hazards as their
// relevance area and event mark with cause and remaining validity; fed by the server-sent events of
// /v1/live/events (a snapshot each ~0.5 s while anything changes). 404 on /v1/live: no data plane configured.
const LIVE_W = 1000, LIVE_H = 96, ROAD_Y = 34, ROAD_H = 36;
const MODE_COLOR = {model: "#2f6fde", fallback: "#d64545"};
let liveSource = null;

function roadSvg(road, vehicles, hazards) {
  const xs = [...vehicles.map(v => v.x_m), ...hazards.flatMap(h => [h.from_x_m, h.to_x_m])];
  let lo = Math.min(...xs), hi = Math.max(...xs);
  if (hi - lo < 100) { const mid = (lo + hi) / 2; lo = mid - 50; hi = mid + 50; }
  const pad = (hi - lo) * 0.04; lo -= pad; hi += pad;
  const X = x => (40 + (LIVE_W - 80) * (x - lo) / (hi - lo)).toFixed(1);
  const parts = [
    el("svg:rect", {x: 40, y: ROAD_Y, width: LIVE_W - 80, height: ROAD_H, fill: "#4a505c", class: "live-road"}),
    el("svg:text", {x: 0, y: ROAD_Y + 22, "font-size": 12, "font-weight": 600}, road),
    el("svg:text", {x: 40, y: LIVE_H - 2, "font-size": 10, fill: "#6b7385"}, `${lo.toFixed(0)} m`),
    el("svg:text", {x: LIVE_W - 40, y: LIVE_H - 2, "font-size": 10, fill: "#6b7385", "text-anchor": "end"}, `${hi.toFixed(0)} m`),
  ];
  for (const h of hazards) {
    const g = el("svg:g", {class: "live-hazard", "data-action": h.action, "data-x": h.x_m});
    g.appendChild(el("svg:rect", {x: X(h.from_x_m), y: ROAD_Y, width: Math.max(1, X(h.to_x_m) - X(h.from_x_m)),
      height: ROAD_H, fill: "#d9822b", "fill-opacity": 0.35, class: "live-hazard-area"}));
    g.appendChild(el("svg:path", {d: `M${X(h.x_m)},${ROAD_Y - 2} l-6,-10 h12 z`, fill: "#d9822b", class: "live-hazard-event"}));
    g.appendChild(el("svg:text", {x: X(h.x_m), y: 12, "font-size": 11, "text-anchor": "middle", class: "live-hazard-label"},
      `${h.cause_name} · ${Math.round(h.remaining_s)} s`));
    parts.push(g);
  }
  vehicles.forEach((v, i) => {
    const y = ROAD_Y + 8 + 20 * (Math.max(0, v.lane) % 2);
    const g = el("svg:g", {class: `live-vehicle mode-${v.mode}`, "data-vehicle": v.vehicle_id, "data-x": v.x_m,
      "data-mode": v.mode});
    g.appendChild(el("svg:circle", {cx: X(v.x_m), cy: y, r: 6, fill: MODE_COLOR[v.mode] || "#6b7385", stroke: "#fff"}));
    g.appendChild(el("svg:text", {x: X(v.x_m), y: i % 2 ? ROAD_Y + ROAD_H + 12 : ROAD_Y - 4, "font-size": 10,
      "text-anchor": "middle"}, `${v.vehicle_id} ${(v.speed_mps * 3.6).toFixed(0)} km/h`));
    parts.push(g);
  });
  const svg = el("svg:svg", {width: "100%", height: LIVE_H, viewBox: `0 0 ${LIVE_W} ${LIVE_H}`, role: "img",
    "data-road": road});
  svg.replaceChildren(...parts);
  return svg;
}

function renderLive(snap) {
  const notes = [`${snap.vehicles.length} vehicles · ${snap.hazards.length} active hazards`];
  if (!snap.connected) notes.push("broker not connected");
  if (!snap.hazard_verification) notes.push("no hazard key: hazards cannot be verified");
  document.getElementById("live-status").textContent = notes.join(" · ");
  document.getElementById("live-roads").replaceChildren(...snap.roads.map(road =>
    roadSvg(road, snap.vehicles.filter(v => v.road === road), snap.hazards.filter(h => h.road === road))));
  const vrows = snap.vehicles.map(v => {
    const tr = el("tr", {class: `mode-${v.mode}`, "data-vehicle": v.vehicle_id});
    [v.vehicle_id, v.road, v.x_m.toFixed(1), v.lane, (v.speed_mps * 3.6).toFixed(0), v.mode, v.model_version || "",
     v.age_s.toFixed(1)].forEach(c => tr.appendChild(el("td", {}, String(c))));
    return tr;
  });
  document.querySelector("#live-vehicles tbody").replaceChildren(...vrows);
  const hrows = snap.hazards.map(h => {
    const tr = el("tr", {"data-action": h.action});
    const advisory = [h.advisory_speed_mps != null ? `≤ ${(h.advisory_speed_mps * 3.6).toFixed(0)} km/h` : "",
                      h.advisory_time_gap_s != null ? `gap ≥ ${h.advisory_time_gap_s} s` : ""].filter(Boolean).join(", ");
    [h.action, h.cause_name, h.road, h.x_m.toFixed(0), `${h.from_x_m.toFixed(0)}–${h.to_x_m.toFixed(0)}`, advisory,
     Math.round(h.remaining_s)].forEach(c => tr.appendChild(el("td", {}, String(c))));
    return tr;
  });
  document.querySelector("#live-hazards tbody").replaceChildren(...hrows);
}

async function startLive() {
  const status = document.getElementById("live-status");
  let resp;
  try { resp = await fetch("/v1/live", {cache: "no-store"}); } catch (err) { setTimeout(startLive, 5000); return; }
  if (resp.status === 404) {
    status.textContent = "no live data plane configured";
    document.getElementById("live-card").classList.add("off");
    return;
  }
  if (resp.ok) renderLive(await resp.json());
  liveSource = new EventSource("/v1/live/events");
  liveSource.addEventListener("snapshot", e => renderLive(JSON.parse(e.data)));
  liveSource.onerror = () => {
    if (liveSource.readyState === EventSource.CLOSED) {  // refused (429) or gone: try again later
      status.textContent = "live stream refused or lost; retrying…";
      liveSource = null;
      setTimeout(startLive, 5000);
    }
  };
}

const pageParams = new URLSearchParams(window.location.search);
for (const [name, id] of Object.entries(LOG_FILTERS)) {
  const input = document.getElementById(id);
  if (pageParams.has(name)) input.value = pageParams.get(name);
  input.addEventListener("change", refreshLogs);
}
document.querySelectorAll("button[data-action]").forEach(b => b.addEventListener("click", () => act(b.dataset.action)));
refresh();
setInterval(refresh, REFRESH_MS);
startLive();
