"""Model registry with lineage: content-addressed ONNX blobs, one manifest per version, an SQL index.

Layout under ``root``::

    blobs/<sha256>.onnx      the model bytes, named by their hash (identical models share one blob)
    manifests/v<N>.json      the manifest of version N (a copy of the index's record, for people and OTA)
    registry.db              the index (SQLite by default; any SQLAlchemy URL, e.g. PostgreSQL, works)

Rules it keeps:
- The index is the truth. ``register`` writes the blob first (temp file + fsync + rename), then the
  manifest file, and inserts the index row last inside one transaction, so a crash at any point leaves
  either a complete version or none (an orphan blob or manifest file is harmless and reused/overwritten).
- Only ONNX graphs with the contract's I/O are accepted (ContractError otherwise).
- Versions are assigned by the registry: 1, 2, 3… across all names.
- Stages move only along ``candidate → validated → released``; a candidate or validated model may be
  ``rejected`` and a released one ``revoked``. Every move is recorded with its reason and time.
- ``verify`` re-hashes the blob so tampering is caught before a model is shipped.
"""

from __future__ import annotations

import builtins
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Float, ForeignKey, Integer, String, Text, create_engine, event, func, select, text
from sqlalchemy.exc import IntegrityError as SqlIntegrityError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from driveloop.contracts import observation as C
from driveloop.contracts.manifest import ModelManifest, build_manifest, parse_manifest, sha256_file
from driveloop.core.atomic import fsync_replace, temp_path_for, write_atomic
from driveloop.core.exceptions import ContractError, IntegrityError, ModelError, NoModelError, RegistryError
from driveloop.core.version import parse_model_version

logger = logging.getLogger(__name__)

CANDIDATE, VALIDATED, RELEASED, REJECTED, REVOKED = "candidate", "validated", "released", "rejected", "revoked"
STAGES = (CANDIDATE, VALIDATED, RELEASED, REJECTED, REVOKED)
TRANSITIONS: dict[str, frozenset[str]] = {
    CANDIDATE: frozenset({VALIDATED, REJECTED}),
    VALIDATED: frozenset({RELEASED, REJECTED}),
    RELEASED: frozenset({REVOKED}),
    REJECTED: frozenset(),
    REVOKED: frozenset(),
}
_VERSION_RACE_RETRIES = 5  # a fallback only: writers are serialized (BEGIN IMMEDIATE / advisory lock)
_PG_REGISTER_LOCK = 0x6472_766C  # "drvl": advisory lock key serializing version assignment on PostgreSQL


def _serialize_sqlite_writers(engine: Engine) -> None:
    """Start every SQLite transaction with BEGIN IMMEDIATE (SQLAlchemy's documented pysqlite recipe).

    pysqlite's deferred transactions let two writers both read max(version) and then deadlock on the
    lock upgrade (SQLITE_BUSY without waiting). Taking the write lock up front makes concurrent
    registrations queue on the busy timeout instead.
    """

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def check_transition(current: str, target: str) -> None:
    """Pure rule of the stage machine; RegistryError for an unknown stage or an illegal move."""
    if target not in TRANSITIONS:
        raise RegistryError(f"unknown stage {target!r}; stages: {', '.join(STAGES)}")
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none (final)"
        raise RegistryError(f"illegal stage change {current} -> {target} (allowed from {current}: {allowed})")


def check_onnx_io(path: Path) -> None:
    """Refuse a file that is not an ONNX graph with the contract's I/O (names, per-sample shapes, batch axis)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # protobuf decode errors are untyped
        raise ContractError(f"{path.name} is not a readable ONNX model: {e}") from e
    for kind, values, specs in (("input", graph.input, C.INPUTS), ("output", graph.output, C.OUTPUTS)):
        got = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
               for v in values}
        want = {s.name: [None, *s.shape] for s in specs}
        if got != want:
            raise ContractError(f"{path.name}: {kind}s {got} differ from the contract {want} (None = dynamic batch)")
        not_float = [v.name for v in values if v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT]
        if not_float:
            raise ContractError(f"{path.name}: {kind}s {not_float} are not float32")


class _Base(DeclarativeBase):
    pass


def _is_variant(row: _ModelRow) -> bool:
    return parse_manifest(row.manifest_json, source=f"registry record v{row.version}").variant is not None


class _ModelRow(_Base):
    __tablename__ = "models"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(128), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    stage: Mapped[str] = mapped_column(String(16), index=True)
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[str] = mapped_column(String(40))
    manifest_json: Mapped[str] = mapped_column(Text)


class _StageEventRow(_Base):
    __tablename__ = "stage_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[int] = mapped_column(ForeignKey("models.version"), index=True)
    from_stage: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_stage: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    at_s: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class ModelArtifact:
    """A registered model as a vehicle or the OTA release needs it."""

    onnx_path: Path
    manifest: ModelManifest
    stage: str
    manifest_path: Path

    @property
    def version(self) -> int:
        return self.manifest.version


@dataclass(frozen=True)
class StageEvent:
    version: int
    from_stage: str | None
    to_stage: str
    reason: str
    at_s: float


class Registry:
    """The model registry (see module docstring). Use as a context manager or call ``close()``."""

    def __init__(self, root: Path | str, db_url: str | None = None) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs"
        self.manifests_dir = self.root / "manifests"
        for d in (self.blobs_dir, self.manifests_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url or f"sqlite:///{(self.root / 'registry.db').resolve()}"
        sqlite = self.db_url.startswith("sqlite")
        try:
            self._engine = create_engine(self.db_url, connect_args={"timeout": 30} if sqlite else {})
            if sqlite:
                _serialize_sqlite_writers(self._engine)
            _Base.metadata.create_all(self._engine)
        except SQLAlchemyError as e:
            raise RegistryError(f"cannot open registry index {self.db_url}: {e}") from e

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------------

    def register(
        self,
        onnx_path: Path | str,
        *,
        name: str = "policy",
        parent_version: int | None = None,
        dataset_version: str | None = None,
        training_run: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
        variant: dict[str, Any] | None = None,
        now_s: float | None = None,
    ) -> ModelManifest:
        """Store ``onnx_path`` as the next version (stage candidate) and return its manifest.

        ``variant`` ({method, parent}) marks a compressed form of ``parent``; its parent is then also
        ``parent_version`` (one lineage), and a variant of a variant is refused.
        """
        src = Path(onnx_path)
        if not src.is_file():
            raise RegistryError(f"model file not found: {src}")
        check_onnx_io(src)
        if variant is not None and variant.get("parent") != parent_version:
            raise RegistryError(f"a variant's parent ({variant.get('parent')}) must be its parent_version ({parent_version})")
        sha = self._store_blob(src)
        at_s = time.time() if now_s is None else now_s
        for _attempt in range(_VERSION_RACE_RETRIES):
            with self._session() as s:
                if self._engine.dialect.name == "postgresql":  # one version assigner at a time, per database
                    s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_REGISTER_LOCK})
                parent_row = None if parent_version is None else s.get(_ModelRow, parent_version)
                if parent_version is not None and parent_row is None:
                    raise RegistryError(f"parent version {parent_version} is not in the registry")
                if variant is not None and parent_row is not None and _is_variant(parent_row):
                    raise RegistryError(f"v{parent_version} is itself a compressed variant: compress its parent instead")
                version = (s.scalar(select(func.max(_ModelRow.version))) or 0) + 1
                manifest = build_manifest(
                    self.blob_path(sha), name=name, version=version, sha256=sha,
                    parent_version=parent_version, dataset_version=dataset_version,
                    training_run=training_run, metrics=metrics, lineage=lineage, variant=variant,
                )
                self._write_manifest_file(manifest)
                try:
                    self._insert(s, manifest, at_s)
                    s.commit()
                except SqlIntegrityError:  # another writer took this version number: try the next
                    s.rollback()
                    continue
            logger.info("registered %s v%d (sha256 %s…)", name, version, sha[:12])
            return manifest
        raise RegistryError("could not assign a version: too many concurrent registrations")

    def _store_blob(self, src: Path) -> str:
        """Copy ``src`` into blobs/ under its hash (temp + fsync + rename); returns the hash."""
        tmp = temp_path_for(self.blobs_dir / "incoming.onnx")
        try:
            shutil.copyfile(src, tmp)
            sha = sha256_file(tmp)
            dest = self.blob_path(sha)
            if dest.is_file() and sha256_file(dest) == sha:
                tmp.unlink()
            else:  # absent or damaged: (re)place it
                fsync_replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return sha

    def _insert(self, s: Session, manifest: ModelManifest, at_s: float) -> None:
        """The index row: the last step of ``register``, committed by the caller."""
        s.add(_ModelRow(
            version=manifest.version, name=manifest.name, sha256=manifest.sha256, stage=CANDIDATE,
            parent_version=manifest.parent_version, created_at=manifest.created_at,
            manifest_json=manifest.to_json(),
        ))
        s.flush()
        s.add(_StageEventRow(version=manifest.version, from_stage=None, to_stage=CANDIDATE,
                             reason="registered", at_s=at_s))
        s.flush()

    def set_stage(self, version: int, stage: str, reason: str, *, now_s: float | None = None) -> StageEvent:
        """Move ``version`` to ``stage`` if the stage machine allows it; records the reason."""
        if not reason.strip():
            raise RegistryError("a stage change needs a reason")
        at_s = time.time() if now_s is None else now_s
        with self._session() as s:
            row = self._row(s, version)
            check_transition(row.stage, stage)
            event = StageEvent(version, row.stage, stage, reason, at_s)
            row.stage = stage
            s.add(_StageEventRow(version=version, from_stage=event.from_stage, to_stage=stage, reason=reason, at_s=at_s))
            s.commit()
        logger.info("model v%d: %s -> %s (%s)", version, event.from_stage, stage, reason)
        return event

    # -- reading -------------------------------------------------------------------------------------

    def get(self, ref: int | str) -> ModelArtifact:
        """``ref``: a version (3, "3", "v3"), "latest", or a stage name meaning its newest version."""
        with self._session() as s:
            row = self._resolve(s, ref)
            manifest = parse_manifest(row.manifest_json, source=f"registry record v{row.version}")
            stage = row.stage
        path = self.manifest_path(manifest.version)
        if not path.is_file() or path.read_text() != manifest.to_json() + "\n":
            self._write_manifest_file(manifest)  # repair an orphaned or stale copy from the index
        return ModelArtifact(self.blob_path(manifest.sha256), manifest, stage, path)

    def resolve(self, ref: int | str | None = None) -> ModelArtifact:
        """The model to drive or fine-tune from: ``ref`` as :meth:`get` reads it, or with no ref (None or
        "") the newest released model, else the newest validated one (a fresh registry has only that).

        NoModelError when neither exists, so callers can answer with their own error and exit code.
        """
        if ref is not None and ref != "":
            return self.get(ref)
        with self._session() as s:
            newest = (self._newest(s, stage) for stage in (RELEASED, VALIDATED))
            version = next((row.version for row in newest if row is not None), None)
        if version is None:
            raise NoModelError("the registry holds no released or validated model: run `driveloop bootstrap`")
        return self.get(version)

    def learning_base(self, ref: int | str | None = None) -> ModelArtifact:
        """The model to fine-tune from: :meth:`resolve`'s answer, or, when that is a compressed variant (a
        released student or INT8 graph), its parent: the loop learns on from the full model, whose torch
        weights it has; the variant is only the form the fleet runs."""
        artifact = self.resolve(ref)
        variant = artifact.manifest.variant
        return artifact if variant is None else self.get(variant.parent)

    def list(self) -> builtins.list[tuple[ModelManifest, str]]:
        """Every version with its stage, oldest first."""
        with self._session() as s:
            rows = s.scalars(select(_ModelRow).order_by(_ModelRow.version)).all()
            return [(parse_manifest(r.manifest_json, source=f"registry record v{r.version}"), r.stage) for r in rows]

    def variants(self, version: int) -> builtins.list[ModelArtifact]:
        """The compressed variants of ``version`` (any stage), oldest first."""
        with self._session() as s:
            self._row(s, version)
            rows = s.scalars(select(_ModelRow).where(_ModelRow.parent_version == version).order_by(_ModelRow.version)).all()
            versions = [r.version for r in rows if _is_variant(r)]
        return [self.get(v) for v in versions]

    def history(self, version: int) -> builtins.list[StageEvent]:
        """The stage moves of ``version``, oldest first."""
        with self._session() as s:
            self._row(s, version)
            rows = s.scalars(select(_StageEventRow).where(_StageEventRow.version == version).order_by(_StageEventRow.id))
            return [StageEvent(r.version, r.from_stage, r.to_stage, r.reason, r.at_s) for r in rows]

    def lineage(self, version: int) -> builtins.list[ModelManifest]:
        """``version``'s manifest, then its parent's, and so on back to a root model."""
        chain: builtins.list[ModelManifest] = []
        seen: set[int] = set()
        current: int | None = version
        while current is not None:
            if current in seen:  # parents always predate children, so this means a corrupt index
                raise RegistryError(f"lineage of v{version} loops at v{current}")
            seen.add(current)
            manifest = self.get(current).manifest
            chain.append(manifest)
            current = manifest.parent_version
        return chain

    def verify(self, version: int) -> str:
        """Re-hash the blob of ``version``; IntegrityError when it is missing or differs from the manifest."""
        artifact = self.get(version)
        if not artifact.onnx_path.is_file():
            raise IntegrityError(f"model v{version}: blob {artifact.onnx_path.name} is missing")
        try:
            actual = sha256_file(artifact.onnx_path)
        except ModelError as e:
            raise IntegrityError(f"model v{version}: {e}") from e
        if actual != artifact.manifest.sha256:
            raise IntegrityError(f"model v{version}: sha256 {actual[:12]}… != manifest {artifact.manifest.sha256[:12]}…")
        return actual

    def blob_path(self, sha256: str) -> Path:
        return self.blobs_dir / f"{sha256}.onnx"

    def manifest_path(self, version: int) -> Path:
        return self.manifests_dir / f"v{version}.json"

    # -- internals -----------------------------------------------------------------------------------

    def _session(self) -> Session:
        return Session(self._engine, expire_on_commit=False)

    def _write_manifest_file(self, manifest: ModelManifest) -> None:
        write_atomic(self.manifest_path(manifest.version), (manifest.to_json() + "\n").encode())

    def _row(self, s: Session, version: int) -> _ModelRow:
        row = s.get(_ModelRow, version)
        if row is None:
            raise RegistryError(f"model version {version} is not in the registry")
        return row

    def _newest(self, s: Session, stage: str | None) -> _ModelRow | None:
        query = select(_ModelRow).order_by(_ModelRow.version.desc()).limit(1)
        if stage is not None:
            query = query.where(_ModelRow.stage == stage)
        return s.scalars(query).first()

    def _resolve(self, s: Session, ref: int | str) -> _ModelRow:
        text = ref.strip().lower() if isinstance(ref, str) else None
        if text == "latest" or text in STAGES:
            row = self._newest(s, None if text == "latest" else text)
            if row is None:
                raise RegistryError(f"no model matches {ref!r} in the registry")
            return row
        if text is not None and not any(c.isdigit() for c in text):
            raise RegistryError(f"unknown model ref {ref!r}: use a version, 'latest' or one of {', '.join(STAGES)}")
        # A number: one rule for 3, "3" and "v3"; 0, "3x" or a 30-digit number are ConfigErrors.
        return self._row(s, parse_model_version(ref if text is None else text, allow_prefix=True))
