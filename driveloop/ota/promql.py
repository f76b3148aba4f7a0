"""Health gates fed by Prometheus: per-cohort stats read back with PromQL (``/api/v1/query``).

Used when ``PROMETHEUS_URL`` is set (e.g. several fleet-server replicas behind one Prometheus). The
fleet server exports the stage's extensive sums per cohort (:mod:`driveloop.ota.metrics`); one instant
query per evaluation selects them by rollout and stage and rebuilds the exact
:class:`~driveloop.ota.gates.HealthWindow` the gate needs. Missing series mean "no data"
(→ inconclusive, hold); an unreachable or failing Prometheus is an error, never a silent zero.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from driveloop.core.exceptions import ConfigError, OtaError
from driveloop.ota.gates import CohortStats, HealthWindow, ShadowAggregate
from driveloop.ota.metrics import PREFIX

if TYPE_CHECKING:
    from driveloop.ota.store import Rollout

logger = logging.getLogger(__name__)

_INT_FIELDS = {f.name for f in fields(CohortStats) if f.type in ("int", int)} | \
    {f.name for f in fields(ShadowAggregate) if f.type in ("int", int)}


def _label(value: str) -> str:
    """Escape a PromQL label value (double-quoted string)."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def stage_selector(rollout_id: int, stage: str) -> str:
    return (f'{{__name__=~"{PREFIX}_(health|shadow)_.+",rollout="{rollout_id}",'
            f'stage="{_label(stage)}"}}')


def window_from_samples(samples: list[dict[str, Any]]) -> HealthWindow:
    """Rebuild a HealthWindow from an instant-vector result of :func:`stage_selector`."""
    cohorts: dict[str, dict[str, Any]] = {"canary": {}, "control": {}}
    shadow: dict[str, Any] = {}
    for s in samples:
        name = s["metric"]["__name__"]
        try:
            value = float(s["value"][1])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise OtaError(f"malformed Prometheus sample for {name}: {s!r}") from e
        if name.startswith(f"{PREFIX}_health_"):
            field = name[len(f"{PREFIX}_health_"):]
            cohort = s["metric"].get("cohort")
            if cohort in cohorts and field in {f.name for f in fields(CohortStats)}:
                cohorts[cohort][field] = int(value) if field in _INT_FIELDS else value
        elif name.startswith(f"{PREFIX}_shadow_"):
            field = name[len(f"{PREFIX}_shadow_"):]
            if field in {f.name for f in fields(ShadowAggregate)}:
                shadow[field] = int(value) if field in _INT_FIELDS else value
    return HealthWindow(CohortStats(**cohorts["canary"]), CohortStats(**cohorts["control"]),
                        ShadowAggregate(**shadow))


class PromHealthSource:
    """A gate's health source backed by Prometheus' HTTP API."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"PROMETHEUS_URL must be http(s)://…, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, promql: str) -> list[dict[str, Any]]:
        import httpx

        try:
            r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=self.timeout_s)
            body = r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise OtaError(f"cannot query Prometheus at {self.url}: {e}") from e
        if r.status_code != 200 or body.get("status") != "success":
            raise OtaError(f"Prometheus query failed ({r.status_code}): {body.get('error', body)}")
        if body["data"]["resultType"] != "vector":
            raise OtaError(f"expected an instant vector, got {body['data']['resultType']}")
        return list(body["data"]["result"])

    def stage_window(self, rollout_id: int, stage: str) -> HealthWindow:
        return window_from_samples(self.query(stage_selector(rollout_id, stage)))

    def window(self, rollout: Rollout) -> HealthWindow:
        st = rollout.state
        w = self.stage_window(st.rollout_id, st.stage(rollout.plan).name)
        logger.debug("PromQL window for rollout %d: %s", st.rollout_id, w)
        return w
