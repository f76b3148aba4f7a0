"""The model manifest (DESIGN.md: Model artifact) and the file helpers that keep artifacts whole.

A manifest travels with every ``model.onnx``: it names the model, pins its bytes by sha256, records
its I/O contract, where it came from (parent version, dataset version, training run, FL lineage) and
the eval-gate metrics that let it through. It is validated at every trust boundary (registry, OTA,
vehicle), so it is a frozen pydantic model that rejects unknown fields.

A compressed model (a distilled student, an INT8 graph) carries ``variant`` {method, parent}: the vehicle
and the release know it is a deployment form of model ``parent``, not a new policy. The field is written
only when set, so every manifest without it is byte-for-byte what it was before the field existed (and
vehicles that predate it still read those).

Files are written atomically (``core.atomic``): a reader sees the old manifest or the new one, never
half of one.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError
from pydantic import field_validator, model_serializer

from driveloop.contracts.observation import io_contract
from driveloop.core.atomic import file_sha256, write_atomic
from driveloop.core.exceptions import ModelError
from driveloop.core.version import MODEL_VERSION_MAX, MODEL_VERSION_MIN

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
_HEX = frozenset("0123456789abcdef")


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in chunks (models may be large)."""
    try:
        return file_sha256(path, _CHUNK_BYTES)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e}") from e


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


VARIANT_METHODS = ("distill", "int8")


class ModelVariant(BaseModel):
    """How a compressed model was made from its parent (``method`` one of ``VARIANT_METHODS``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    parent: int = Field(ge=MODEL_VERSION_MIN, le=MODEL_VERSION_MAX)

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in VARIANT_METHODS:
            raise ValueError(f"variant method must be one of {', '.join(VARIANT_METHODS)}")
        return v


class ModelManifest(BaseModel):
    """What a model is, where it came from and why it was allowed through (immutable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: int = Field(ge=MODEL_VERSION_MIN, le=MODEL_VERSION_MAX)  # the one rule: core/version.py
    sha256: str = Field(min_length=64, max_length=64)
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    obs_version: int = Field(ge=1)
    parent_version: int | None = Field(default=None, ge=MODEL_VERSION_MIN, le=MODEL_VERSION_MAX)
    dataset_version: str | None = None
    training_run: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=utc_now_iso)
    lineage: dict[str, Any] = Field(default_factory=dict)
    variant: ModelVariant | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_variant(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("variant", 0) is None:  # a plain model: the manifest stays as it always was
            del data["variant"]
        return data

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not set(v) <= _HEX:
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return v

    @field_validator("created_at")
    @classmethod
    def _iso_utc(cls, v: str) -> str:
        ts = datetime.fromisoformat(v)
        if ts.utcoffset() is None or ts.utcoffset().total_seconds() != 0:  # type: ignore[union-attr]
            raise ValueError("created_at must be an ISO-8601 timestamp in UTC")
        return v

    def io_matches_contract(self) -> bool:
        """True when the manifest's declared I/O is this build's observation contract."""
        c = io_contract()
        return (self.obs_version, self.inputs, self.outputs) == (c["obs_version"], c["inputs"], c["outputs"])

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def build_manifest(
    onnx_path: Path | str,
    *,
    name: str,
    version: int,
    parent_version: int | None = None,
    dataset_version: str | None = None,
    training_run: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    created_at: str | None = None,
    sha256: str | None = None,
    variant: ModelVariant | dict[str, Any] | None = None,
) -> ModelManifest:
    """A manifest for ``onnx_path``: hashes the file and takes the I/O from ``contracts.observation``."""
    contract = io_contract()
    try:
        return ModelManifest(
            name=name,
            version=version,
            sha256=sha256 or sha256_file(onnx_path),
            inputs=contract["inputs"],  # type: ignore[arg-type]
            outputs=contract["outputs"],  # type: ignore[arg-type]
            obs_version=contract["obs_version"],  # type: ignore[arg-type]
            parent_version=parent_version,
            dataset_version=dataset_version,
            training_run=dict(training_run or {}),
            metrics=dict(metrics or {}),
            lineage=dict(lineage or {}),
            created_at=created_at or utc_now_iso(),
            variant=variant,  # type: ignore[arg-type]
        )
    except ValidationError as e:
        raise ModelError(f"invalid manifest for {onnx_path}: {_first_error(e)}") from e


def parse_manifest(text: str | bytes, *, source: str = "manifest") -> ModelManifest:
    """Validate manifest JSON from an untrusted source (file, HTTP body); ModelError when bad."""
    try:
        return ModelManifest.model_validate_json(text)
    except ValidationError as e:
        raise ModelError(f"invalid {source}: {_first_error(e)}") from e


def read_manifest(path: Path | str) -> ModelManifest:
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read manifest {path}: {e}") from e
    return parse_manifest(text, source=f"manifest {path}")


def write_manifest(manifest: ModelManifest, path: Path | str) -> Path:
    """Write ``manifest`` as JSON, atomically."""
    return write_atomic(Path(path), (manifest.to_json() + "\n").encode())


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "value"
    return f"{where}: {err.get('msg', 'invalid')}"


def canonical_json(data: dict[str, Any]) -> str:
    """Stable JSON (sorted keys) for storing dicts in the registry index."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))
