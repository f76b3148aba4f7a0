"""Bearer tokens for driveloop's servers (cloud ingest, OTA fleet server), implemented once.

Rules every server keeps:

- A token is ``secrets.token_urlsafe`` output (256 bits by default), shown to its owner once.
- Only ``sha256(token)`` (hex) is stored: a leaked database yields no usable token, and with 256 bits
  of entropy a fast hash is enough (no password KDF needed). The format is what existing databases
  hold, so it must not change.
- Verification hashes the presented token and compares digests with ``hmac.compare_digest``, so the
  time taken does not reveal how much of a guess was right; a missing stored hash costs the same.
- ``Authorization: Bearer <token>``: the scheme is case-insensitive, the token is stripped.
- Admin tokens are named (``alice``, ``ci``…) so the audit records *who* acted, from the token used and
  never from the request body; each is at least ``MIN_ADMIN_TOKEN_CHARS`` long, on every server.
- A bearer token travels only over HTTPS, or plain HTTP to a loopback host (``check_token_url``).

Stdlib only, no network: the servers map a failed check to their own HTTP answer.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from driveloop.core.exceptions import ConfigError

__all__ = ["TOKEN_BYTES", "MIN_ADMIN_TOKEN_CHARS", "new_token", "hash_token", "verify_token", "parse_bearer",
           "check_admin_token", "parse_named_tokens", "AdminTokens", "is_loopback_host", "check_token_url"]

logger = logging.getLogger(__name__)

TOKEN_BYTES = 32  # 256 bits of entropy
_NO_HASH = "0" * 64  # compared against when there is no stored hash, so both paths cost the same
_SCHEME = "bearer"
MIN_ADMIN_TOKEN_CHARS = 16  # an operator-chosen secret: long enough that guessing it online is hopeless
ADMIN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")  # goes into the audit log and log lines
DEFAULT_ADMIN_NAME = "admin"  # the name of the single, unnamed admin token of older setups


def new_token(nbytes: int = TOKEN_BYTES) -> str:
    """A fresh random token, URL-safe base64 (never contains ``.``, so it can follow a ``<id>.``)."""
    return secrets.token_urlsafe(nbytes)


def hash_token(token: str) -> str:
    """The stored form of a token: sha256 of its UTF-8 bytes, lowercase hex (64 chars)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def verify_token(token: str | None, stored_hash: str | None) -> bool:
    """True when ``token`` hashes to ``stored_hash``, compared in constant time.

    An empty/missing token or a missing stored hash is False, after the same comparison work."""
    expected = stored_hash if stored_hash is not None else _NO_HASH
    same = hmac.compare_digest(hash_token(token or "").encode("utf-8"), expected.encode("utf-8"))
    return same and bool(token) and stored_hash is not None


def parse_bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization`` header value ``Bearer <token>`` (stripped; may be empty),
    or None when the header is missing or uses another scheme."""
    if not authorization:
        return None
    scheme, sep, token = authorization.partition(" ")
    if not sep or scheme.lower() != _SCHEME:
        return None
    return token.strip()


def check_admin_token(token: str) -> str:
    """``token`` unchanged if it is long enough to be an admin token, else ConfigError (one line)."""
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise ConfigError(f"an admin token must be at least {MIN_ADMIN_TOKEN_CHARS} characters")
    return token


def parse_named_tokens(text: str) -> dict[str, str]:
    """``"alice:TOKEN,ci:TOKEN"`` (an environment variable's form) → {name: token}; ConfigError if
    a name is malformed or repeated or a token too short."""
    named: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, token = item.partition(":")
        if not sep or ADMIN_NAME_RE.fullmatch(name) is None:
            raise ConfigError(f"named admin tokens are NAME:TOKEN pairs separated by commas; bad name {name!r:.40}")
        if name in named:
            raise ConfigError(f"admin token name {name!r} given twice")
        named[name] = check_admin_token(token.strip())
    return named


class AdminTokens:
    """Named admin tokens, stored as sha256 only. ``identify`` compares a presented token against every
    entry (no early exit), so the time taken reveals neither which name matched nor how many exist."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        for name in hashes:
            if ADMIN_NAME_RE.fullmatch(name) is None:
                raise ConfigError(f"bad admin token name {name!r:.40}")
        self._hashes = dict(hashes)

    @classmethod
    def from_tokens(cls, tokens: Mapping[str, str]) -> AdminTokens:
        """From plain tokens ({name: token}); each must pass :func:`check_admin_token`."""
        return cls({name: hash_token(check_admin_token(t)) for name, t in tokens.items()})

    def __bool__(self) -> bool:
        return bool(self._hashes)

    def names(self) -> list[str]:
        return sorted(self._hashes)

    def identify(self, token: str | None) -> str | None:
        """The name of the admin token ``token`` is, or None."""
        found = None
        for name, stored in self._hashes.items():
            if verify_token(token, stored):
                found = name
        return found


def is_loopback_host(host: str | None) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1): traffic that never leaves the machine."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token_url(url: str, allow_insecure: bool = False) -> str:
    """``url`` unchanged if a bearer token may be sent to it: ``https://``, or ``http://`` to a loopback
    host. Plain HTTP elsewhere would hand the token to anyone on the path: ConfigError, unless
    ``allow_insecure`` (an explicit opt-in), which logs a loud warning instead."""
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.hostname)):
        return url
    if parts.scheme != "http":
        raise ConfigError(f"server URL must be http(s)://…, got {url!r:.80}")
    if not allow_insecure:
        raise ConfigError(f"refusing to send a bearer token over plain HTTP to {parts.hostname}: use https:// "
                          "(servers take --tls-cert/--tls-key); plain http:// is for loopback only")
    logger.warning("INSECURE: sending a bearer token over plain HTTP to %s; anyone on the path can steal it",
                   parts.hostname)
    return url
