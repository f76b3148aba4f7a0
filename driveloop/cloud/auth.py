"""Per-vehicle bearer tokens for the ingest API.

A token is ``<vehicle_id>.<secret>``: the id says which vehicle row to check, the secret is 32 random
bytes. Only ``sha256(secret)`` is stored and the comparison is constant-time: generation, hashing,
verification and header parsing are ``driveloop.core.tokens`` (shared with the OTA server); the
vehicle-id rule is ``driveloop.core.ids``. This module adds the cloud's token shape and the catalog.
Failures: no/garbled/unknown/wrong credentials → AuthError 401; a known but disabled vehicle, or a
vehicle touching another vehicle's upload, or a non-admin calling an admin endpoint → AuthError 403.
A malformed token, an unknown vehicle and a wrong secret get the *same* 401 text (``BAD_CREDENTIALS``),
so the answer does not tell which vehicle ids exist; only a caller holding a valid token learns more.
"""

from __future__ import annotations

import logging

from driveloop.cloud.catalog import Catalog, VehicleRecord
from driveloop.core.exceptions import AuthError
from driveloop.core.ids import check_vehicle_id, is_vehicle_id
from driveloop.core.tokens import AdminTokens, hash_token, new_token, parse_bearer, verify_token

logger = logging.getLogger(__name__)

_SEP = "."  # secrets are URL-safe base64, never containing "."
BAD_CREDENTIALS = "unknown vehicle or wrong token"

def _new_token(vehicle_id: str) -> tuple[str, str]:
    secret = new_token()
    return f"{vehicle_id}{_SEP}{secret}", hash_token(secret)


def parse_token(token: str) -> tuple[str, str]:
    """Split a token into (vehicle id, secret); anything malformed is a 401."""
    vehicle_id, sep, secret = token.rpartition(_SEP)
    if not sep or not secret or not is_vehicle_id(vehicle_id):
        raise AuthError(BAD_CREDENTIALS, status=401)
    return vehicle_id, secret


def bearer_token(authorization: str | None) -> str:
    """The token from an ``Authorization: Bearer …`` header (401 when missing or another scheme)."""
    if not authorization:
        raise AuthError("missing bearer token", status=401)
    token = parse_bearer(authorization)
    if not token:
        raise AuthError("expected 'Authorization: Bearer <token>'", status=401)
    return token


def register_vehicle(catalog: Catalog, vehicle_id: str, now_s: float) -> str:
    """Add a vehicle and return its token (shown once; only its hash is kept)."""
    token, digest = _new_token(check_vehicle_id(vehicle_id))
    catalog.add_vehicle(vehicle_id, digest, now_s)
    logger.info("registered vehicle %s", vehicle_id)
    return token


def rotate_token(catalog: Catalog, vehicle_id: str) -> str:
    """Issue a new token for a known vehicle; the old one stops working at once."""
    token, digest = _new_token(check_vehicle_id(vehicle_id))
    catalog.update_vehicle(vehicle_id, token_hash=digest)
    logger.info("rotated token of vehicle %s", vehicle_id)
    return token


def authenticate(catalog: Catalog, token: str) -> VehicleRecord:
    """The vehicle a token belongs to; 401 for unknown/wrong, 403 for a disabled vehicle."""
    vehicle_id, secret = parse_token(token)
    vehicle = catalog.get_vehicle(vehicle_id)
    # verify_token compares against a dummy hash for unknown vehicles too, so both paths cost the same.
    ok = verify_token(secret, vehicle.token_hash if vehicle is not None else None)
    if vehicle is None or not ok:
        raise AuthError(BAD_CREDENTIALS, status=401)
    if not vehicle.enabled:
        raise AuthError(f"vehicle {vehicle_id} is disabled", status=403)
    return vehicle


def check_admin(token: str, admins: AdminTokens) -> str:
    """The name of the admin token ``token`` is (what logs record as the actor); a server started
    without admin tokens refuses every admin endpoint (403)."""
    if not admins:
        raise AuthError("admin API disabled on this server (no admin token configured)", status=403)
    name = admins.identify(token)
    if name is None:
        raise AuthError("not an admin token", status=403)
    return name
