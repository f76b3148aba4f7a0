"""TLS for driveloop's servers and their clients, defined once (stdlib only).

| side | rule |
|---|---|
| server (``cloud serve``, ``ota serve``) | HTTPS when given ``--tls-cert`` and ``--tls-key`` (both or neither, files must exist) |
| server on a non-loopback interface without TLS | starts, with a loud warning: its clients' tokens would cross the network in clear text (and they refuse to send them, see ``core.tokens.check_token_url``) |
| client | verifies the server's certificate against ``ca_file`` only (a fleet's private CA) when given, else the system CAs; never "verify nothing" |
"""

from __future__ import annotations

import ssl
from pathlib import Path

from driveloop.core.exceptions import ConfigError
from driveloop.core.tokens import is_loopback_host

__all__ = ["client_verify", "plaintext_warning", "server_tls"]


def server_tls(cert: Path | str | None, key: Path | str | None) -> dict[str, str]:
    """uvicorn's TLS keyword arguments (``ssl_certfile``, ``ssl_keyfile``), empty for plain HTTP."""
    if (cert is None) != (key is None):
        raise ConfigError("HTTPS needs both --tls-cert and --tls-key")
    if cert is None or key is None:
        return {}
    for f in (cert, key):
        if not Path(f).is_file():
            raise ConfigError(f"TLS file {f} does not exist")
    try:  # load once here, so a bad file is a one-line error, not a traceback from uvicorn's startup
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot use TLS certificate {cert} with key {key}: {e}") from e
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}


def client_verify(ca_file: Path | str | None) -> ssl.SSLContext | bool:
    """What an httpx client verifies server certificates against: ``True`` (the system CAs) or a
    context trusting only ``ca_file``. A missing or unreadable CA file is a ConfigError."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load CA file {ca_file}: {e}") from e


def plaintext_warning(host: str, tls: bool) -> str | None:
    """The warning a server prints when it serves bearer-token APIs in clear text beyond loopback."""
    if tls or is_loopback_host(host):
        return None
    return (f"WARNING: serving plain HTTP on {host}: bearer tokens would cross the network in clear text, "
            "and vehicles refuse to send them; pass --tls-cert and --tls-key")
