"""The one model-version rule: named tables of inputs, each with the exact outcome of the parser, the
canonical-text check and the pydantic wire pattern."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field, ValidationError

from driveloop.core.exceptions import ConfigError
from driveloop.core.version import (
    MODEL_VERSION_MAX,
    MODEL_VERSION_PATTERN,
    check_model_version_text,
    model_version_text,
    parse_model_version,
)

# (name, input, allow_prefix, expected number)
PARSED = [
    ("int_one", 1, False, 1),
    ("int", 3, False, 3),
    ("text", "3", False, 3),
    ("text_max", str(MODEL_VERSION_MAX), False, MODEL_VERSION_MAX),
    ("int_max", MODEL_VERSION_MAX, False, MODEL_VERSION_MAX),
    ("leading_zeros", "007", False, 7),
    ("prefix_v", "v3", True, 3),
    ("prefix_capital_v", "V12", True, 12),
    ("prefix_with_int", 5, True, 5),
    ("prefix_optional", "42", True, 42),
]

# (name, input, allow_prefix, words the one-line ConfigError must contain)
REJECTED = [
    ("zero_int", 0, False, "invalid model version 0"),
    ("zero_text", "0", False, "invalid model version '0'"),
    ("zeros_text", "000", False, "invalid model version '000'"),
    ("negative_int", -1, False, "invalid model version -1"),
    ("negative_text", "-3", False, "invalid model version '-3'"),
    ("plus_sign", "+3", False, "invalid model version '+3'"),
    ("prefix_not_allowed", "v3", False, "invalid model version 'v3'"),
    ("double_prefix", "vv3", True, "invalid model version 'vv3'"),
    ("prefix_alone", "v", True, "invalid model version 'v'"),
    ("other_letter", "x3", True, "invalid model version 'x3'"),
    ("empty", "", False, "invalid model version ''"),
    ("space", " 3", False, "invalid model version ' 3'"),
    ("trailing_newline", "3\n", False, "invalid model version '3\\n'"),
    ("decimal_text", "3.0", False, "invalid model version '3.0'"),
    ("float", 3.0, False, "invalid model version 3.0"),
    ("bool", True, False, "invalid model version True"),
    ("none", None, False, "invalid model version None"),
    ("bytes", b"3", False, "invalid model version b'3'"),
    ("path", "../3", True, "invalid model version '../3'"),
    ("non_ascii_digit", "\u0663", False, "invalid model version"),  # ARABIC-INDIC THREE: str.isdigit() says yes
    ("superscript", "\u00b3", False, "invalid model version"),
    ("int_above_max", MODEL_VERSION_MAX + 1, False, f"model version {MODEL_VERSION_MAX + 1} is too large"),
    ("int32_max", 2**31 - 1, False, "is too large"),
    ("text_above_max", str(MODEL_VERSION_MAX + 1), False, "is too large"),
    ("huge_text", "99999999999999999999999", False, "model version '99999999999999999999999' is too large"),
    ("huge_text_prefixed", "v99999999999999999999999", True, "is too large"),
    ("huge_int", 10**5000, False, "model version of 16610 bits is too large"),  # no OverflowError, no 5000-digit str
    ("ten_thousand_digits", "9" * 10_000, False, "is too large"),
]

# (name, text, canonical?) for the wire: the Python check and the pydantic pattern must agree
WIRE = [
    ("one", "1", True),
    ("three", "3", True),
    ("max", str(MODEL_VERSION_MAX), True),
    ("leading_zero", "03", False),
    ("zero", "0", False),
    ("prefixed", "v3", False),
    ("above_max", str(MODEL_VERSION_MAX + 1), False),
    ("old_label", "model-v1", False),
    ("semver", "1.2.0", False),
    ("empty", "", False),
    ("parent_path", "../x", False),
]


@pytest.mark.parametrize(("name", "value", "allow_prefix", "expected"), PARSED, ids=[c[0] for c in PARSED])
def test_parse_accepts(name: str, value: object, allow_prefix: bool, expected: int) -> None:
    number = parse_model_version(value, allow_prefix=allow_prefix)
    assert number == expected and type(number) is int
    assert model_version_text(value, allow_prefix=allow_prefix) == str(expected)


@pytest.mark.parametrize(("name", "value", "allow_prefix", "words"), REJECTED, ids=[c[0] for c in REJECTED])
def test_parse_rejects_with_one_line_config_error(name: str, value: object, allow_prefix: bool, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_model_version(value, allow_prefix=allow_prefix)
    message = str(info.value)
    assert words in message and "\n" not in message and len(message) < 200
    with pytest.raises(ConfigError):
        model_version_text(value, allow_prefix=allow_prefix)


class _Wire(BaseModel):
    version: str = Field(pattern=MODEL_VERSION_PATTERN)


@pytest.mark.parametrize(("name", "text", "canonical"), WIRE, ids=[c[0] for c in WIRE])
def test_wire_check_and_pattern_agree(name: str, text: str, canonical: bool) -> None:
    if canonical:
        assert check_model_version_text(text) == text
        assert _Wire(version=text).version == text
        return
    with pytest.raises(ConfigError):
        check_model_version_text(text)
    with pytest.raises(ValidationError):
        _Wire(version=text)


def test_check_names_the_canonical_form_and_refuses_non_text() -> None:
    with pytest.raises(ConfigError, match="'03' is not canonical: write it as 3"):
        check_model_version_text("03")
    with pytest.raises(ConfigError, match="must be a string, got int"):
        check_model_version_text(3)
