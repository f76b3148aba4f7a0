"""The one vehicle-id rule: a table of named ids, checked by the Python check and the pydantic pattern."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field, ValidationError

from driveloop.core.exceptions import ConfigError
from driveloop.core.ids import VEHICLE_ID_MAX_CHARS, VEHICLE_ID_PATTERN, check_vehicle_id, is_vehicle_id

VALID = [
    ("letters", "veh"),
    ("digit_first", "0car"),
    ("one_char", "v"),
    ("dash_dot_underscore", "veh-0.a_b"),
    ("trailing_dot", "v."),
    ("dots_inside", "a..b"),
    ("looks_like_a_priority", "car-p1"),
    ("max_length", "x" * VEHICLE_ID_MAX_CHARS),
]

INVALID = [
    ("empty", ""),
    ("dot", "."),
    ("dotdot", ".."),
    ("leading_dot", ".hidden"),
    ("leading_dash", "-v"),
    ("leading_underscore", "_v"),
    ("slash", "a/b"),
    ("parent_path", "../x"),
    ("backslash", "a\\b"),
    ("nul", "a\x00b"),
    ("space", "a b"),
    ("trailing_newline", "veh\n"),
    ("too_long", "x" * (VEHICLE_ID_MAX_CHARS + 1)),
    ("non_ascii_letter", "vé"),
    ("non_ascii_digit", "v\u0661"),  # ARABIC-INDIC DIGIT ONE: a digit to str.isdigit, not to the rule
    ("quote", 'v"x'),
    ("equals", "a=b"),
]


class _Wire(BaseModel):
    vehicle_id: str = Field(pattern=VEHICLE_ID_PATTERN)


@pytest.mark.parametrize("name,value", VALID, ids=[c[0] for c in VALID])
def test_valid_ids_pass_unchanged(name: str, value: str) -> None:
    assert is_vehicle_id(value)
    assert check_vehicle_id(value) == value


@pytest.mark.parametrize("name,value", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_ids_raise_a_one_line_config_error(name: str, value: str) -> None:
    assert not is_vehicle_id(value)
    with pytest.raises(ConfigError) as e:
        check_vehicle_id(value)
    assert "\n" not in str(e.value) and "vehicle id" in str(e.value)


@pytest.mark.parametrize("value", [None, 5, b"veh"], ids=["none", "int", "bytes"])
def test_non_strings_are_refused(value: object) -> None:
    assert not is_vehicle_id(value)
    with pytest.raises(ConfigError):
        check_vehicle_id(value)


@pytest.mark.parametrize("name,value,ok", [(n, v, True) for n, v in VALID] + [(n, v, False) for n, v in INVALID],
                         ids=[c[0] for c in VALID + INVALID])
def test_pydantic_pattern_agrees_with_the_check(name: str, value: str, ok: bool) -> None:
    """Wire models (contracts.fleet) use the pattern; it must accept exactly what the check accepts."""
    if ok:
        assert _Wire(vehicle_id=value).vehicle_id == value
    else:
        with pytest.raises(ValidationError):
            _Wire(vehicle_id=value)


def test_long_garbage_is_cut_in_the_message() -> None:
    with pytest.raises(ConfigError) as e:
        check_vehicle_id("/" * 10_000)
    assert len(str(e.value)) < 300


def test_fleet_contracts_use_the_one_pattern() -> None:
    from driveloop.contracts import fleet

    assert fleet.VEHICLE_ID_PATTERN is VEHICLE_ID_PATTERN
