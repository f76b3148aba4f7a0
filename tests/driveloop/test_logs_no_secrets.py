"""No token, key or secret in any log line, and every line valid: the real ``driveloop cloud serve`` and
``driveloop ota serve`` processes over HTTPS (a CA made for the test), tokens issued by each, a vehicle
that drives, uploads and ships its logs to the ingest server over HTTPS, refused requests carrying
wrong and right-looking tokens; then every log the run produced — each process's JSON-lines file,
the servers' stderr, the vehicle spools and the cloud's log index — is validated against the schema
and searched for every secret the test issued or used."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from driveloop.contracts.logline import log_line_schema
from tests.driveloop.test_tls import Pki, _free_port, pki  # noqa: F401  (the CA fixture)
from tests.fakes.serve import driveloop_command

pytestmark = pytest.mark.slow


def _wait(url: str, ca: Path, proc: subprocess.Popen[bytes], probe: str) -> None:
    for _ in range(300):
        try:
            if httpx.get(url + probe, verify=str(ca), timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, "server exited early"
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


def test_no_secret_in_any_log_line(random_home: Path, tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    home = tmp_path / "home"
    shutil.copytree(random_home, home)
    ingest_admin, fleet_admin = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("DRIVELOOP_")}
    env = base_env | {"DRIVELOOP_HOME": str(home), "DRIVELOOP_CA_FILE": str(pki.ca)}
    run = lambda *a, extra=None: subprocess.run([*driveloop_command(), *a], env=env | (extra or {}), capture_output=True,  # noqa: E731
                                                 timeout=600)
    p_in, p_fl = _free_port(), _free_port()
    tls = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    logs_out = tmp_path / "server-output"
    logs_out.mkdir()
    ingest = subprocess.Popen([*driveloop_command(), "cloud", "serve", "--port", str(p_in), *tls],
                              env=env | {"DRIVELOOP_CLOUD_ADMIN_TOKEN": ingest_admin},
                              stdout=open(logs_out / "ingest.out", "wb"), stderr=open(logs_out / "ingest.err", "wb"))
    fleet = subprocess.Popen([*driveloop_command(), "ota", "serve", "--port", str(p_fl), "--allow-unreleased", *tls],
                             env=env | {"DRIVELOOP_OTA_ADMIN_TOKEN": fleet_admin},
                             stdout=open(logs_out / "fleet.out", "wb"), stderr=open(logs_out / "fleet.err", "wb"))
    cloud_url, fleet_url = f"https://127.0.0.1:{p_in}", f"https://127.0.0.1:{p_fl}"
    try:
        _wait(cloud_url, pki.ca, ingest, "/healthz")
        _wait(fleet_url, pki.ca, fleet, "/v1/dashboard")
        added = run("cloud", "vehicles", "add", "veh000", "--json")
        assert added.returncode == 0, added.stderr
        cloud_token = json.loads(added.stdout)["token"]
        with httpx.Client(verify=str(pki.ca), timeout=30) as http:
            r = http.post(f"{fleet_url}/v1/vehicles", json={"vehicle_id": "veh000"},
                          headers={"Authorization": f"Bearer {fleet_admin}"})
            assert r.status_code == 201
            fleet_token = r.json()["token"]
            assert http.get(f"{fleet_url}/v1/update", params={"vehicle": "veh000"},
                            headers={"Authorization": f"Bearer {fleet_token}"}).status_code == 200
            # Refusals the servers log: a stolen-looking token, an admin token on a vehicle route, a garbled one.
            forged = f"veh000.{secrets.token_urlsafe(32)}"
            for url, token in ((f"{cloud_url}/v1/logs/batch", forged), (f"{cloud_url}/v1/logs/batch", ingest_admin),
                               (f"{cloud_url}/v1/campaigns", cloud_token + "x")):
                assert http.post(url, json={"lines": []}, headers={"Authorization": f"Bearer {token}"}).status_code \
                    in (401, 403, 405)
            assert http.post(f"{fleet_url}/v1/rollouts", json={}, headers={"Authorization": f"Bearer {forged}"}
                             ).status_code in (401, 403)
        drive = run("drive", "--vehicles", "1", "--duration", "8", "--scenario", "ccrs-50", "--json",
                    extra={"DRIVELOOP_CLOUD_URL": cloud_url, "DRIVELOOP_CLOUD_TOKEN": cloud_token})
        assert drive.returncode == 0, drive.stderr
        shipped = json.loads(drive.stdout)["logs"]
        assert shipped["errors"] == {} and shipped["accepted"] > 0 and shipped["pending"] == 0
        found = run("logs", "search", "", "--json", "--limit", "10000")
        assert found.returncode == 0
        index_lines = json.loads(found.stdout)["lines"]
        assert any(x.get("event.action") == "fcw" and x["vehicle.id"] == "veh000" for x in index_lines)
    finally:
        for proc in (ingest, fleet):
            proc.terminate()
            proc.wait(timeout=30)
    secrets_used = {cloud_token, cloud_token.split(".", 1)[1], fleet_token, ingest_admin, fleet_admin, forged,
                    forged.split(".", 1)[1]}
    key_markers = ("PRIVATE KEY", pki.key.read_text().splitlines()[1])
    schema = log_line_schema()
    files = [*sorted((home / "logs").glob("*.jsonl")), *sorted(logs_out.glob("*.err"))]
    assert {f.name for f in files} >= {"ingest.jsonl", "fleet.jsonl", "drive.jsonl", "cloud.jsonl"}
    checked = 0
    for f in files:
        for line in f.read_text().splitlines():
            if f.suffix == ".err" and not line.startswith("{"):
                assert line.startswith(("driveloop ingest on", "fleet server on")), line  # the banner only
                continue
            jsonschema.validate(json.loads(line), schema)
            checked += 1
    for x in index_lines:
        jsonschema.validate(x, schema)
    assert checked > 0 and len(index_lines) > 0
    ingest_lines = [json.loads(x) for x in (home / "logs" / "ingest.jsonl").read_text().splitlines()]
    assert sum("refused (401)" in x["message"] for x in ingest_lines) >= 2  # the forged tokens were logged as refusals
    assert all(x["service.name"] == "ingest" for x in ingest_lines)
    fleet_lines = [json.loads(x) for x in (home / "logs" / "fleet.jsonl").read_text().splitlines()]
    assert any("enrolled vehicle veh000" in x["message"] for x in fleet_lines)
    blobs = [f.read_bytes() for f in files] + [p.read_bytes() for p in (home / "logspool").glob("*")]
    blobs += [p.read_bytes() for p in (home / "cloud").glob("logs.db*")]
    blobs.append(json.dumps(index_lines).encode())
    for blob in blobs:
        for s in (*secrets_used, *key_markers):
            assert s.encode() not in blob, f"a secret reached the logs: {s[:6]}…"
