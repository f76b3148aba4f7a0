"""Bearer tokens for driveloop's servers (cloud ingest, OTA fleet server), implemented once.

Rules every server keeps:

- A token is ``secrets.token_urlsafe`` output (256 bits by default), shown to its owner once.
- Only ``sha256(token)`` (hex) is stored: a leaked database yields no usable token, and with 256 bits
  of entropy a fast hash is enough (no password KDF needed). The format is what existing databases
  hold, so it must not change.
- Verification hashes the presented token and compares digests with ``hmac.compare_digest``, so the
  time taken does not reveal how much of a guess was right; a missing stored hash costs the same.
- ``Authorization: Bearer <token>``: the scheme is case-insensitive, the token is stripped.

Stdlib only, no network: the servers map a failed check to their own HTTP answer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["TOKEN_BYTES", "new_token", "hash_token", "verify_token", "parse_bearer"]

TOKEN_BYTES = 32  # 256 bits of entropy
_NO_HASH = "0" * 64  # compared against when there is no stored hash, so both paths cost the same
_SCHEME = "bearer"


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
