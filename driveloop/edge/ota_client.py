"""A vehicle's link to the fleet server: ask the director, update the A/B slots, report health.

The updater (:mod:`driveloop.edge.updater`) verifies and installs; this client adds the fleet server's
HTTP API around it (per-vehicle bearer token):

- ``GET /v1/update?vehicle=…`` → :class:`~driveloop.contracts.fleet.UpdateOffer` (what to run, and what to
  run in shadow);
- ``POST /v1/installed`` ← the version the updater installed and booted (its running slot), before the
  first report of that version under each director answer: the server counts a report only for the
  version the director assigned this vehicle and it confirmed installing;
- ``POST /v1/health`` ← :class:`~driveloop.contracts.fleet.HealthReport` once per health window.

A new active version is installed into the inactive slot and boots on the *next* start (the fleet
runner restarts its vehicles between windows); a shadow version is installed without switching, so it
can run beside the active model and become active later without a second download.

The token goes only to ``https://`` (verified against ``ca_file``, the fleet's CA, when given; TUF
downloads use the same client) or to plain ``http://`` on loopback; an injected ``http`` client is the
caller's to configure.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from driveloop.core.tls import client_verify
from driveloop.core.tokens import check_token_url
from driveloop.edge.fetcher import ResumableFetcher
from driveloop.edge.health_window import HealthWindowResult
from driveloop.edge.updater import VehicleUpdater
from driveloop.core.exceptions import OtaError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveModel:
    """The model a start of the vehicle runs: its verified file and manifest, and whether it is on trial."""

    version: str
    path: Path
    manifest: dict[str, Any]
    trial: bool


class OtaClient:
    """One vehicle's OTA session against the fleet server at ``server_url``."""

    def __init__(self, vehicle_id: str, server_url: str, token: str, vehicle_dir: Path,
                 http: httpx.Client | None = None, hardware_class: str = "cpu", ca_file: Path | None = None) -> None:
        self.vehicle_id = vehicle_id
        self.server_url = server_url.rstrip("/")
        fetcher = None
        if http is None:
            check_token_url(self.server_url)
            http = httpx.Client(timeout=30.0, verify=client_verify(ca_file))
            fetcher = ResumableFetcher(Path(vehicle_dir) / "downloads", client=http)
        self.updater = VehicleUpdater(vehicle_dir, f"{self.server_url}/tuf", fetcher=fetcher,
                                      hardware_class=hardware_class,
                                      director=f"{self.server_url}/director/{vehicle_id}")
        self._http = http
        self._headers = {"Authorization": f"Bearer {token}"}
        self.shadow: ActiveModel | None = None
        self._rollout: int | None = None  # the rollout of the director's last answer
        self._confirmed: tuple[str, int | None] | None = None  # (version, rollout) last confirmed
        self._booted: str | None = None

    # -- boot ----------------------------------------------------------------------------------------
    def start(self) -> ActiveModel:
        """Boot: the updater picks the slot (a pending one gets its trial) and verifies its bytes."""
        path = self.updater.boot()
        manifest = json.loads((path.parent / "manifest.json").read_text())
        self._booted = str(manifest["version"])  # what this start runs, verified: what its reports confirm
        return ActiveModel(self._booted, path, manifest, self.updater.state().trial)

    def close_window(self, result: HealthWindowResult) -> None:
        """Judge a trial model's health window: commit it, revert it, or keep watching."""
        self.updater.report_health(result)

    # -- director ------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        try:
            r = self._http.request(method, f"{self.server_url}{path}", headers=self._headers, **kw)
        except httpx.HTTPError as e:
            raise OtaError(f"fleet server unreachable: {e}") from e
        if r.status_code >= 400:
            raise OtaError(f"fleet server answered {r.status_code} to {method} {path}: {r.text[:200]}")
        return r.json()

    def offer(self) -> dict[str, Any]:
        return self._request("GET", "/v1/update", params={"vehicle": self.vehicle_id})

    def sync(self, active: ActiveModel) -> dict[str, Any]:
        """Ask the director and act on its answer; returns the offer (with what was done in ``action``)."""
        offer = self.offer()  # also has the director sign this vehicle's assignment (Uptane)
        self._rollout = offer.get("rollout_id")
        want, shadow = self.updater.assigned(offer.get("version"), offer.get("shadow_version"))
        action = "none"
        if want is not None and want != active.version:
            state = self.updater.state()
            other = state.slot(state.inactive)
            # Only a release this vehicle has committed before (at or under the rollback floor) is a switch
            # back; a shadow-installed slot holds a newer release that never drove: it boots as a trial.
            switch_back = other.version == want and other.status == "ready" and not state.trial \
                and other.release_seq <= state.committed_seq
            action = "pending" if self.updater.update(want) else "rejected-or-current"
            if switch_back and action == "pending":
                # Back to a release this vehicle already ran and committed (an aborted rollout): no new
                # trial window — a failed trial would otherwise return the car to the aborted model.
                self.updater.boot()
                self.updater.commit()
                action = "reverted"
        self.shadow = None
        if shadow is not None and shadow != active.version:
            self.shadow = self._install_shadow(shadow)
            action = "shadow"
        offer["action"] = action
        return offer

    def _install_shadow(self, version: str) -> ActiveModel | None:
        offer = self.updater.check(version, role="shadow")
        if offer is None:
            return None
        slot = self.updater.download_and_install(offer)
        path = self.updater.slot_path(slot)
        manifest = json.loads((path.parent / "manifest.json").read_text())
        return ActiveModel(version, path, manifest, trial=False)

    # -- health --------------------------------------------------------------------------------------
    def report(self, model_version: str, window_start_s: float, window_end_s: float, metrics: Any,
               inference_p99_ms: float, shadow: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one health window (DESIGN.md: Health) built from the vehicle's metrics for that window,
        confirming the running slot's version first where the server has not had it under this rollout."""
        # The version this start booted (a trial judged at the window's end may already have been reverted:
        # the window was still driven on it), else the running slot's.
        running = self.updater.state()
        installed = self._booted or str(running.slot(running.running).version)
        if installed == model_version and self._confirmed != (installed, self._rollout):
            try:
                self._request("POST", "/v1/installed", json={"vehicle_id": self.vehicle_id, "version": installed})
                self._confirmed = (installed, self._rollout)
            except OtaError as e:  # not what the director assigned: the report is sent and rejected (counted)
                logger.warning("install confirmation of %s refused: %s", installed, e)
        report = {
            "vehicle_id": self.vehicle_id, "model_version": model_version,
            "window_start_s": window_start_s, "window_end_s": window_end_s, "seq": time.time_ns() // 1_000,  # monotonic across restarts
            "ticks": metrics.ticks, "fallback_interventions": metrics.interventions,
            "collisions": metrics.collisions, "deadline_misses": metrics.watchdog.get("deadline", 0),
            "inference_p99_ms": inference_p99_ms, "crashes": 0, "shadow": shadow,
        }
        return self._request("POST", "/v1/health", json=report)
