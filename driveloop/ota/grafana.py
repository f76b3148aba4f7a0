"""Grafana provisioning for ``driveloop ota grafana``: a Prometheus data source and the rollout dashboard.

Idempotent: both are addressed by fixed uids — an existing data source is updated in place, the
dashboard is saved with ``overwrite`` — so provisioning twice leaves one of each. The dashboard is
built with grafana-foundation-sdk's typed builders (panels, queries, units), never hand-written JSON;
it charts the metrics :mod:`driveloop.ota.metrics` exports, then an *Alerts* row (what the alert rules in
``deploy/prometheus/alerts.yml`` watch) and a *Logs* row (log throughput and safety events).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from driveloop.core.exceptions import ConfigError, OtaError

logger = logging.getLogger(__name__)

DATASOURCE_UID = "driveloop-prometheus"
DATASOURCE_NAME = "driveloop Prometheus"
DASHBOARD_UID = "driveloop-rollout"
DASHBOARD_TITLE = "driveloop · staged OTA rollout"

# (title, PromQL, legend, unit, width): one row of the grid each two panels
PANELS: tuple[tuple[str, str, str, str, int], ...] = (
    ("Rollout stage", "driveloop_ota_rollout_stage", "{{stage}} ({{version}})", "none", 8),
    ("Rollout status", "driveloop_ota_rollout_status == 1", "{{status}}", "none", 8),
    ("Fleet share per model version", "driveloop_ota_fleet_vehicles", "{{version}}", "none", 8),
    ("Cohort sizes", "driveloop_ota_cohort_size", "{{cohort}}", "none", 12),
    ("Interventions per hour by cohort", "driveloop_ota_cohort_interventions_per_h", "{{cohort}}", "none", 12),
    ("Inference p99 by cohort", "driveloop_ota_cohort_p99_ms", "{{cohort}}", "ms", 12),
    ("Collisions and crashes by cohort",
     "driveloop_ota_health_collisions or driveloop_ota_health_crashes", "{{__name__}} {{cohort}}", "none", 12),
    ("Update outcomes (per minute)", "sum by (outcome) (rate(driveloop_ota_updates_total[5m])) * 60",
     "{{outcome}}", "none", 12),
    ("Server latency p99", "histogram_quantile(0.99, sum by (le, route) "
     "(rate(driveloop_ota_request_seconds_bucket[5m])))", "{{route}}", "s", 12),
)
# The rows below the rollout panels: what the alert rules (deploy/prometheus/alerts.yml) watch, and the
# log path's throughput and the safety events it carries (the lines themselves: the fleet dashboard's
# logs panel and `driveloop logs search`).
ROWS: tuple[tuple[str, tuple[tuple[str, str, str, str, int], ...]], ...] = (
    ("Alerts", (
        ("Alerts firing", 'ALERTS{alertstate="firing", alertname=~"Driveloop.*"}', "{{alertname}}", "none", 24),
        ("Ingest 5xx ratio", 'sum(rate(driveloop_ingest_requests_total{code="5xx"}[5m])) / '
         "clamp_min(sum(rate(driveloop_ingest_requests_total[5m])), 1e-9)", "5xx share", "percentunit", 8),
        ("Stream consumer lag", "driveloop_stream_consumer_lag", "{{consumer}}", "none", 8),
        ("Watchdog activations per vehicle-hour", 'sum(rate(driveloop_stream_events_total{kind="watchdog"}[15m])) / '
         'clamp_min(sum(rate(driveloop_stream_consumed_total{stream="TELEMETRY"}[15m])), 1e-9) * 36000',
         "watchdog / vehicle-h", "none", 8),
        ("FL rounds skipped (30 min)", 'increase(driveloop_fl_rounds_total{outcome="skipped"}[30m])', "{{run}}",
         "none", 12),
        ("Inference p99 vs the 40 ms alert", "max by (cohort) (driveloop_ota_cohort_p99_ms)", "{{cohort}}", "ms", 12),
    )),
    ("Logs", (
        ("Log lines ingested per second", "sum by (outcome) (rate(driveloop_ingest_log_lines_total[5m]))",
         "{{outcome}}", "none", 12),
        ("Safety events per minute", "sum by (kind) (rate(driveloop_stream_events_total[5m])) * 60", "{{kind}}",
         "none", 12),
    )),
)


def build_dashboard(datasource_uid: str = DATASOURCE_UID) -> dict[str, Any]:
    """The rollout dashboard as Grafana JSON, produced by the typed builder."""
    from grafana_foundation_sdk.builders import dashboard as dash
    from grafana_foundation_sdk.builders import prometheus, stat, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    ds = DataSourceRef(type_val="prometheus", uid=datasource_uid)
    b = (dash.Dashboard(DASHBOARD_TITLE).uid(DASHBOARD_UID).tags(["driveloop", "ota"]).refresh("10s")
         .time("now-6h", "now").editable())
    for i, (title, expr, legend, unit, width) in enumerate(PANELS):
        panel = stat.Panel() if i < 3 else timeseries.Panel()
        panel = (panel.title(title).datasource(ds).unit(unit).span(width).height(6)
                 .with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(65 + i))))
        b = b.with_panel(panel)
    for row_title, panels in ROWS:
        b = b.with_row(dash.Row(row_title))
        for title, expr, legend, unit, width in panels:
            b = b.with_panel(timeseries.Panel().title(title).datasource(ds).unit(unit).span(width).height(6)
                             .with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id("A")))
    return json.loads(json.dumps(b.build(), cls=JSONEncoder))


def datasource_spec(prometheus_url: str) -> dict[str, Any]:
    if not prometheus_url.startswith(("http://", "https://")):
        raise ConfigError(f"Prometheus URL must be http(s)://…, got {prometheus_url!r}")
    return {"uid": DATASOURCE_UID, "name": DATASOURCE_NAME, "type": "prometheus", "access": "proxy",
            "url": prometheus_url, "isDefault": False, "jsonData": {"httpMethod": "POST", "timeInterval": "5s"}}


def provision(url: str, token: str, prometheus_url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Create or update the data source and the dashboard; returns what was done."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError, GrafanaException

    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"Grafana URL must be http(s)://…, got {url!r}")
    spec = datasource_spec(prometheus_url)
    api = GrafanaApi.from_url(url, credential=token, timeout=timeout_s)
    try:
        build = api.health.check() or {}
        try:
            api.datasource.get_datasource_by_uid(DATASOURCE_UID)
            api.datasource.update_datasource_by_uid(DATASOURCE_UID, spec)
            ds_action = "updated"
        except GrafanaClientError as e:
            if e.status_code != 404:
                raise
            api.datasource.create_datasource(spec)
            ds_action = "created"
        try:
            api.dashboard.get_dashboard(DASHBOARD_UID)
            dash_action = "updated"
        except GrafanaClientError as e:
            if e.status_code != 404:
                raise
            dash_action = "created"
        saved = api.dashboard.update_dashboard({"dashboard": build_dashboard(), "overwrite": True,
                                                "message": "provisioned by driveloop ota grafana"})
    except GrafanaException as e:
        raise OtaError(f"Grafana at {url} refused provisioning: {e.message}") from e
    except Exception as e:  # connection errors come from niquests/urllib3 with many types
        if isinstance(e, OtaError):
            raise
        raise OtaError(f"cannot reach Grafana at {url}: {e}") from e
    logger.info("grafana: data source %s, dashboard %s", ds_action, dash_action)
    return {"grafana_version": build.get("version", "unknown"), "datasource_uid": DATASOURCE_UID,
            "datasource": ds_action, "dashboard_uid": DASHBOARD_UID, "dashboard": dash_action,
            "dashboard_url": url.rstrip("/") + str(saved.get("url", f"/d/{DASHBOARD_UID}"))}
