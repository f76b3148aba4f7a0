"""The manifest's ``variant`` field: additive (a manifest without it reads and writes exactly as before),
validated like every other field at the trust boundary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driveloop.contracts.manifest import VARIANT_METHODS, ModelVariant, build_manifest, parse_manifest
from driveloop.core.exceptions import ModelError


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not parsed here: the manifest only hashes the file")
    return path


def test_plain_manifest_is_unchanged_and_old_text_still_reads(onnx_file: Path) -> None:
    plain = build_manifest(onnx_file, name="policy", version=3, created_at="2026-01-01T00:00:00+00:00")
    text = plain.to_json()
    assert "variant" not in json.loads(text) and "variant" not in plain.model_dump(mode="json")
    # What a registry wrote before the field existed parses to the same manifest, and writes back identically.
    again = parse_manifest(json.dumps(json.loads(text), indent=2))
    assert again.variant is None and again.to_json() == text


@pytest.mark.parametrize("method", VARIANT_METHODS)
def test_variant_round_trips(onnx_file: Path, method: str) -> None:
    m = build_manifest(onnx_file, name="policy", version=4, parent_version=3, variant={"method": method, "parent": 3})
    assert m.variant == ModelVariant(method=method, parent=3)
    data = json.loads(m.to_json())
    assert data["variant"] == {"method": method, "parent": 3}
    assert parse_manifest(m.to_json()) == m


BAD_VARIANTS = {
    "unknown method": {"method": "fp16", "parent": 3},
    "parent zero": {"method": "int8", "parent": 0},
    "extra field": {"method": "int8", "parent": 3, "speedup": 9},
    "no parent": {"method": "distill"},
}


@pytest.mark.parametrize("variant", BAD_VARIANTS.values(), ids=BAD_VARIANTS.keys())
def test_bad_variant_is_refused_at_the_boundary(onnx_file: Path, variant: dict[str, object]) -> None:
    good = json.loads(build_manifest(onnx_file, name="policy", version=4).to_json())
    with pytest.raises(ModelError, match="variant"):
        parse_manifest(json.dumps({**good, "variant": variant}))
