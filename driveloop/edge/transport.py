"""How a vehicle talks to the cloud's ingest service: the resumable upload protocol, client side.

The vehicle owns the Protocol (:class:`UploadTransport`) and the HTTP implementation,
:class:`HttpTransport` — the ingest server (``driveloop cloud serve``) with a bearer token. The
embedded local cloud (``cloud.local_transport.LocalTransport``) implements the same Protocol one layer
up; the CLI and the demo choose between them and hand the result to the uploader. A fake with
injectable failures lives in ``tests/fakes/transport.py``.

Protocol (tus-like): ``start`` declares (sha256, size, name) and gets an upload id and the server's
offset (an unfinished upload of the same bytes resumes; already-cataloged bytes answer ``exists``);
``send_chunk`` appends bytes at an offset and returns the new offset; the chunk that completes the
file returns ``cataloged``. Errors: :class:`UploadError` = try again later (connection dropped,
server down; :class:`QuotaExceededError` on a 429, with the server's ``Retry-After``);
:class:`UploadRejectedError` = the server refused for good (its ``offset`` is set on a 409 offset
conflict, so the caller can resync); :class:`AuthError` = credentials refused.
The token goes only to ``https://`` servers, verified against ``ca_file`` when given (a private CA),
or to plain ``http://`` on loopback (``core.tokens.check_token_url``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from driveloop.contracts.upload import CHUNK_CONTENT_TYPE, OFFSET_HEADER, UploadStatus
from driveloop.core.exceptions import (
    AuthError,
    ConfigError,
    QuotaExceededError,
    UploadError,
    UploadRejectedError,
)
from driveloop.core.tls import client_verify
from driveloop.core.tokens import check_token_url

if TYPE_CHECKING:
    from driveloop.edge.triggers import TriggerSpec

logger = logging.getLogger(__name__)


class UploadTransport(Protocol):
    """The vehicle's side of the upload protocol (see the module docstring for the rules)."""

    def start(self, sha256: str, size: int, name: str) -> UploadStatus: ...

    def offset(self, upload_id: str) -> UploadStatus: ...

    def send_chunk(self, upload_id: str, offset: int, data: bytes) -> UploadStatus: ...

    def campaigns(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def campaign_triggers(campaigns: list[dict[str, Any]]) -> list[TriggerSpec]:
    """Recorder triggers from ``campaigns()``: each campaign carries the TriggerSpec the cloud derived
    from it (``trigger``); TriggerSpec re-validates it on the vehicle. Malformed → ConfigError."""
    from driveloop.edge.triggers import TriggerSpec

    specs = []
    for c in campaigns:
        trigger = c.get("trigger") if isinstance(c, Mapping) else None
        if not isinstance(trigger, Mapping):
            raise ConfigError(f"campaign without a trigger: {c!r}")
        try:
            specs.append(TriggerSpec(**dict(trigger)))
        except TypeError as e:
            raise ConfigError(f"campaign trigger has unexpected fields: {e}") from e
    return specs


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    return str(body.get("error", body)) if isinstance(body, Mapping) else str(body)[:200]


def _retry_after(response: httpx.Response) -> int:
    value = response.headers.get("Retry-After", "")
    return min(int(value), 3600) if value.isdigit() else 60


class HttpTransport:
    """The ingest server over HTTP(S). ``ca_file`` pins the CA the server's certificate must chain to.
    ``client`` may be injected (an httpx MockTransport in tests); its transport is then the caller's."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 30.0, client: httpx.Client | None = None,
                 ca_file: Path | str | None = None, allow_insecure: bool = False) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"cloud URL must be http(s)://…, got {base_url!r}")
        if not token:
            raise ConfigError("a cloud token is required for the HTTP transport")
        if client is None:
            check_token_url(base_url, allow_insecure)
            client = httpx.Client(timeout=timeout_s, verify=client_verify(ca_file))
        self._client = client
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One authenticated request; a 2xx/3xx response, else the error tree's answer for its status."""
        headers = {**self._headers, **kwargs.pop("headers", {})}
        try:
            response = self._client.request(method, f"{self._base}{path}", headers=headers, **kwargs)
        except httpx.TransportError as e:  # refused, reset, timed out, dropped mid-body
            raise UploadError(f"{method} {path}: {type(e).__name__}: {e}") from e
        if response.status_code < 400:
            return response
        text = _error_text(response)
        if response.status_code in (401, 403):
            raise AuthError(f"{method} {path}: {text}", status=response.status_code)
        if response.status_code == 429:
            raise QuotaExceededError(f"{method} {path}: {text}", _retry_after(response))
        if response.status_code >= 500:
            raise UploadError(f"{method} {path}: HTTP {response.status_code}: {text}")
        offset = response.headers.get(OFFSET_HEADER)
        raise UploadRejectedError(
            f"{method} {path}: HTTP {response.status_code}: {text}",
            status=response.status_code,
            offset=int(offset) if offset is not None and offset.isdigit() else None,
        )

    def _status(self, response: httpx.Response) -> UploadStatus:
        try:
            return UploadStatus.from_json(response.json())
        except ValueError as e:
            raise UploadError(f"server sent non-JSON reply: {response.text[:200]!r}") from e

    def start(self, sha256: str, size: int, name: str) -> UploadStatus:
        return self._status(self.request("POST", "/v1/uploads", json={"sha256": sha256, "size": size, "name": name}))

    def offset(self, upload_id: str) -> UploadStatus:
        return self._status(self.request("GET", f"/v1/uploads/{upload_id}"))

    def send_chunk(self, upload_id: str, offset: int, data: bytes) -> UploadStatus:
        headers = {OFFSET_HEADER: str(offset), "Content-Type": CHUNK_CONTENT_TYPE}
        return self._status(self.request("PATCH", f"/v1/uploads/{upload_id}", content=data, headers=headers))

    def campaigns(self) -> list[dict[str, Any]]:
        body = self.request("GET", "/v1/campaigns").json()
        if not isinstance(body, Mapping) or not isinstance(body.get("campaigns"), list):
            raise UploadError(f"malformed campaigns reply: {body!r}")
        return list(body["campaigns"])

    def close(self) -> None:
        self._client.close()
