"""Bearer tokens shared by the ingest and fleet servers: generation, stored hash, verification, header."""

from __future__ import annotations

import hashlib
import hmac
import string

import pytest

from driveloop.core import tokens
from driveloop.core.tokens import TOKEN_BYTES, hash_token, new_token, parse_bearer, verify_token


def test_round_trip() -> None:
    token = new_token()
    assert verify_token(token, hash_token(token))


def test_new_tokens_are_random_url_safe_and_dot_free() -> None:
    batch = {new_token() for _ in range(64)}
    assert len(batch) == 64
    allowed = set(string.ascii_letters + string.digits + "-_")
    # 32 bytes of base64 without padding = 43 characters; no "." so the cloud's "<id>.<secret>" splits.
    assert all(len(t) == 43 and set(t) <= allowed for t in batch)
    assert len(new_token(TOKEN_BYTES * 2)) > 43


def test_stored_format_is_unchanged() -> None:
    """Existing catalogs and fleet databases hold sha256 hex of the UTF-8 token: they must still verify."""
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    legacy = hashlib.sha256("tök-en".encode()).hexdigest()
    assert hash_token("tök-en") == legacy and verify_token("tök-en", legacy)


VERIFY = [
    # (name, presented token, stored hash, expected)
    ("right", "secret-a", hash_token("secret-a"), True),
    ("wrong", "secret-b", hash_token("secret-a"), False),
    ("prefix", "secret", hash_token("secret-a"), False),
    ("plaintext_stored", "secret-a", "secret-a", False),
    ("empty_token", "", hash_token(""), False),
    ("none_token", None, hash_token(""), False),
    ("no_stored_hash", "secret-a", None, False),
    ("dummy_hash_is_not_a_match", "x", "0" * 64, False),
]


@pytest.mark.parametrize("name,token,stored,expected", VERIFY, ids=[c[0] for c in VERIFY])
def test_verify(name: str, token: str | None, stored: str | None, expected: bool) -> None:
    assert verify_token(token, stored) is expected


@pytest.mark.parametrize("name,token,stored,expected", VERIFY, ids=[c[0] for c in VERIFY])
def test_every_verification_goes_through_compare_digest(monkeypatch: pytest.MonkeyPatch, name: str,
                                                        token: str | None, stored: str | None,
                                                        expected: bool) -> None:
    """Constant time on every path, missing token and missing stored hash included."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", spy)
    assert verify_token(token, stored) is expected
    assert len(calls) == 1
    assert calls[0][0] == hash_token(token or "").encode()  # digests are compared, never the raw token


HEADERS = [
    # (name, Authorization header value, token or None)
    ("missing", None, None),
    ("empty", "", None),
    ("bearer", "Bearer abc.def", "abc.def"),
    ("lowercase_scheme", "bearer abc", "abc"),
    ("uppercase_scheme", "BEARER abc", "abc"),
    ("extra_spaces_stripped", "Bearer   abc  ", "abc"),
    ("scheme_only", "Bearer", None),
    ("scheme_and_space", "Bearer ", ""),
    ("no_space", "Bearerabc", None),
    ("other_scheme", "Basic dXNlcjpwYXNz", None),
    ("token_scheme", "Token abc", None),
    ("leading_space", " Bearer abc", None),
]


@pytest.mark.parametrize("name,header,expected", HEADERS, ids=[c[0] for c in HEADERS])
def test_parse_bearer(name: str, header: str | None, expected: str | None) -> None:
    assert parse_bearer(header) == expected
