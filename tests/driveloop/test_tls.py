"""HTTPS on both servers (``--tls-cert/--tls-key``) with a CA made here, vehicles and the admin CLI
verifying against that CA (and refusing a server it did not sign), bearer tokens kept off plain HTTP
beyond loopback, and ``cloud serve``'s banner (no catalog password, a loud plain-HTTP warning)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from driveloop.cli import main
from driveloop.cloud.auth import register_vehicle
from driveloop.cloud.catalog import Catalog
from driveloop.cloud.ingest import IngestConfig, create_app, serve_in_thread
from driveloop.cloud.store import ObjectStore
from driveloop.core.exceptions import ConfigError, OtaError, UploadError
from driveloop.core.tls import plaintext_warning, server_tls
from driveloop.core.tokens import check_token_url
from driveloop.edge.ota_client import OtaClient
from driveloop.edge.transport import HttpTransport
from driveloop.ota.server import ServerConfig
from driveloop.ota.server import create_app as fleet_app
from tests.fakes.serve import driveloop_command

ADMIN = "admin-token-0123456789"


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that signed nothing of ours


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and a server certificate for 127.0.0.1 / localhost, made with ``cryptography``."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _ca("driveloop test CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(cert.public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    (d / "other-ca.pem").write_bytes(_ca("someone else's CA")[1].public_bytes(pem))
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "other-ca.pem")


def test_ingest_over_https_verified_against_the_fleet_ca(tmp_path: Path, pki: Pki) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    app = create_app(ObjectStore(tmp_path / "s"), catalog, IngestConfig(staging_dir=tmp_path / "u"))
    token = register_vehicle(catalog, "veh-a", 0.0)
    with serve_in_thread(app, tls_cert=pki.cert, tls_key=pki.key) as url:
        assert url.startswith("https://127.0.0.1:")
        t = HttpTransport(url, token, ca_file=pki.ca)
        assert t.campaigns() == [] and t.start("a" * 64, 10, "x.mcap").offset == 0
        t.close()
        for ca in (None, pki.other_ca):  # the system CAs, or a CA that did not sign it: refused
            with pytest.raises(UploadError, match="CERTIFICATE_VERIFY_FAILED"):
                HttpTransport(url, token, ca_file=ca, timeout_s=5.0).campaigns()
        with pytest.raises(httpx.HTTPError):  # nothing answers plain HTTP on that port
            httpx.get(url.replace("https://", "http://") + "/healthz", timeout=5.0).raise_for_status()
    catalog.close()


@contextmanager
def _fleet_server(tmp: Path, **tls: str) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = fleet_app(ServerConfig(tmp / "ota", ADMIN, background_eval=False, require_release=False))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **tls))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.01)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


def test_fleet_server_over_https_for_vehicles_and_the_admin_cli(tmp_path: Path, pki: Pki,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    with _fleet_server(tmp_path, **server_tls(pki.cert, pki.key)) as url:
        auth = {"Authorization": f"Bearer {ADMIN}"}
        token = httpx.post(f"{url}/v1/vehicles", json={"vehicle_id": "veh-1"}, headers=auth,
                           verify=str(pki.ca)).json()["token"]
        client = OtaClient("veh-1", url, token, tmp_path / "veh-1", ca_file=pki.ca)
        assert client.offer()["reason"] == "no rollout"
        with pytest.raises(OtaError, match="CERTIFICATE_VERIFY_FAILED"):
            OtaClient("veh-1", url, token, tmp_path / "veh-1b", ca_file=pki.other_ca).offer()
        monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "cli"))
        monkeypatch.setenv("DRIVELOOP_OTA_URL", url)
        monkeypatch.setenv("DRIVELOOP_OTA_ADMIN_TOKEN", ADMIN)
        monkeypatch.setenv("DRIVELOOP_CA_FILE", str(pki.ca))
        assert main(["ota", "vehicles", "disable", "veh-1"]) == 0
        assert capsys.readouterr().out == "veh-1: disabled\n"
        with pytest.raises(OtaError, match="403"):
            client.offer()
        monkeypatch.delenv("DRIVELOOP_CA_FILE")
        assert main(["ota", "vehicles", "enable", "veh-1"]) == 9  # the system CAs do not know ours
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err


@pytest.mark.parametrize("url,ok", [
    ("https://fleet.example.com", True), ("http://127.0.0.1:8700", True), ("http://localhost:1", True),
    ("http://[::1]:8700/x", True), ("http://127.8.9.10", True), ("http://10.0.0.5:8750", False),
    ("http://fleet.example.com", False), ("http://127.0.0.1.evil.example", False), ("ftp://127.0.0.1", False),
])
def test_tokens_go_over_plain_http_only_to_loopback(url: str, ok: bool, tmp_path: Path) -> None:
    if ok:
        assert check_token_url(url) == url
        HttpTransport(url, "veh-a.x").close()
        return
    with pytest.raises(ConfigError):
        check_token_url(url)
    with pytest.raises(ConfigError):
        HttpTransport(url, "veh-a.x")
    with pytest.raises(ConfigError):
        OtaClient("veh-1", url, "token", tmp_path / "v")


def test_insecure_opt_in_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    assert check_token_url("http://10.0.0.5:8750", allow_insecure=True) == "http://10.0.0.5:8750"
    assert any("INSECURE" in r.getMessage() for r in caplog.records)
    assert plaintext_warning("0.0.0.0", tls=False) and plaintext_warning("0.0.0.0", tls=True) is None
    assert plaintext_warning("127.0.0.1", tls=False) is None


def test_server_tls_options_are_checked_before_serving(tmp_path: Path, pki: Pki) -> None:
    assert server_tls(None, None) == {}
    for cert, key, message in [(pki.cert, None, "both"), (tmp_path / "nope.pem", pki.key, "does not exist"),
                               (pki.ca, pki.key, "cannot use")]:
        with pytest.raises(ConfigError, match=message):
            server_tls(cert, key)


def test_cloud_serve_banner_hides_the_catalog_password_and_warns_on_plain_http(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from driveloop.cloud import ingest

    served: list[dict[str, Any]] = []
    monkeypatch.setattr(ingest, "build_app", lambda *a, **k: object())  # no database to reach
    monkeypatch.setattr(ingest, "serve", lambda app, **kw: served.append(kw))
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path))
    monkeypatch.setenv("DRIVELOOP_CATALOG_URL", "postgresql+psycopg://ingest:hunter2@db.internal:5432/catalog")
    assert main(["cloud", "serve", "--host", "0.0.0.0", "--port", "8750"]) == 0
    out = capsys.readouterr()
    assert "hunter2" not in out.out + out.err and "ingest:***@db.internal" in out.out
    assert "WARNING: serving plain HTTP on 0.0.0.0" in out.err
    assert served == [{"host": "0.0.0.0", "port": 8750, "tls_cert": None, "tls_key": None}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("area,probe", [("cloud", "/healthz"), ("ota", "/v1/dashboard")])
def test_serve_commands_speak_https_with_tls_flags(area: str, probe: str, tmp_path: Path, pki: Pki) -> None:
    """The real ``driveloop cloud serve`` / ``driveloop ota serve`` processes, on a loopback port."""
    port = _free_port()
    env = os.environ | {"DRIVELOOP_HOME": str(tmp_path), "DRIVELOOP_OTA_ADMIN_TOKEN": ADMIN}
    cmd = driveloop_command()
    proc = subprocess.Popen([*cmd, area, "serve", "--port", str(port), "--tls-cert", str(pki.cert), "--tls-key",
                             str(pki.key)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"https://127.0.0.1:{port}"
        for _ in range(300):
            try:
                r = httpx.get(url + probe, verify=str(pki.ca), timeout=2.0)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                time.sleep(0.2)
        assert r.status_code == 200
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"https://127.0.0.1:{port}" in (out + err).decode()
    assert b"WARNING" not in err
