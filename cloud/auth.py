"""Per-vehicle bearer tokens for the ingest API.

A token is ``<vehicle_id>.<secret>``: the id says which vehicle row to check, the secret is 32 random
bytes. Only ``sha256(secret)`` is stored (a leaked catalog gives no usable token; the secret has 256
bits of entropy, so a fast hash is enough), and the comparison is constant-time (``hmac.compare_digest``).
Failures: no/garbled/unknown/wrong credentials → AuthError 401; a known but disabled vehicle, or a
vehicle touching another vehicle's upload, or a non-admin calling an admin endpoint → AuthError 403.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets

from driveloop.cloud.catalog import Catalog, VehicleRecord
from driveloop.core.exceptions import AuthError, ConfigError

logger = logging.getLogger(__name__)

VEHICLE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # the spool's rule; secrets never contain "."
_SECRET_BYTES = 32
_SEP = "."


def validate_vehicle_id(vehicle_id: str) -> str:
    """Vehicle ids go into tokens, file names and SQL: letters, digits, ``_``, ``.`` and ``-`` only."""
    if not isinstance(vehicle_id, str) or not VEHICLE_ID_RE.match(vehicle_id):
        raise ConfigError(f"vehicle id must match {VEHICLE_ID_RE.pattern}, got {vehicle_id!r}")
    return vehicle_id


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _new_token(vehicle_id: str) -> tuple[str, str]:
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return f"{vehicle_id}{_SEP}{secret}", hash_secret(secret)


def parse_token(token: str) -> tuple[str, str]:
    """Split a token into (vehicle id, secret); anything malformed is a 401."""
    vehicle_id, sep, secret = token.rpartition(_SEP)
    if not sep or not secret or not VEHICLE_ID_RE.match(vehicle_id):
        raise AuthError("malformed token", status=401)
    return vehicle_id, secret


def bearer_token(authorization: str | None) -> str:
    """The token from an ``Authorization: Bearer …`` header (401 when missing or another scheme)."""
    if not authorization:
        raise AuthError("missing bearer token", status=401)
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("expected 'Authorization: Bearer <token>'", status=401)
    return token.strip()


def register_vehicle(catalog: Catalog, vehicle_id: str, now_s: float) -> str:
    """Add a vehicle and return its token (shown once; only its hash is kept)."""
    token, digest = _new_token(validate_vehicle_id(vehicle_id))
    catalog.add_vehicle(vehicle_id, digest, now_s)
    logger.info("registered vehicle %s", vehicle_id)
    return token


def rotate_token(catalog: Catalog, vehicle_id: str) -> str:
    """Issue a new token for a known vehicle; the old one stops working at once."""
    token, digest = _new_token(validate_vehicle_id(vehicle_id))
    catalog.update_vehicle(vehicle_id, token_hash=digest)
    logger.info("rotated token of vehicle %s", vehicle_id)
    return token


def authenticate(catalog: Catalog, token: str) -> VehicleRecord:
    """The vehicle a token belongs to; 401 for unknown/wrong, 403 for a disabled vehicle."""
    vehicle_id, secret = parse_token(token)
    vehicle = catalog.get_vehicle(vehicle_id)
    # Compare against a dummy hash for unknown vehicles too, so both paths cost the same.
    expected = vehicle.token_hash if vehicle is not None else "0" * 64
    ok = hmac.compare_digest(hash_secret(secret), expected)
    if vehicle is None or not ok:
        raise AuthError("unknown vehicle or wrong token", status=401)
    if not vehicle.enabled:
        raise AuthError(f"vehicle {vehicle_id} is disabled", status=403)
    return vehicle


def check_admin(token: str, admin_token_hash: str | None) -> None:
    """Admin endpoints need the admin token; a server started without one refuses them all (403)."""
    if admin_token_hash is None:
        raise AuthError("admin API disabled on this server (no admin token configured)", status=403)
    if not hmac.compare_digest(hash_secret(token), admin_token_hash):
        raise AuthError("not an admin token", status=403)
