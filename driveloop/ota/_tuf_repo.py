"""The TUF repository on disk: load the committed state, sign and publish new metadata versions.

Layout (consistent snapshots): ``metadata/{N.root.json, root.json, N.targets.json, N.snapshot.json,
timestamp.json}`` and ``targets/<sha256>.<name>``. The commit point of every change is one atomic
rename: ``N.root.json`` for a key change, ``timestamp.json`` for everything else. Files written before
a crash but never referenced by the committed timestamp are invisible to clients and are overwritten
by the next publish, so a crash at any point leaves the previous consistent repository.

Root is signed offline (:mod:`driveloop.ota.offline_root`): this module never holds a root key. It
*imports* a signed root (:meth:`TufRepo.import_root`) after checking it continues the chain, adopts the
pending online keys the new root lists and re-signs the other roles under it. A root-only repository
(the director's shared root, which its per-vehicle repositories copy) imports without re-signing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import ConfigError, OtaError, RollbackAttackError, SignatureError
from driveloop.ota._tuf_io import remove_stale_temps
from driveloop.ota.keys import ONLINE_ROLES, ROLES, KeyStore

logger = logging.getLogger(__name__)

_SERIALIZER = JSONSerializer(compact=False)


@dataclass(frozen=True)
class RepoPolicy:
    """Thresholds and metadata lifetimes (seconds) of the repository."""

    root_threshold: int = 1  # root keys a new root gets (offline; see offline_root)
    targets_threshold: int = 1  # targets keys (each signs every release) a new root gets
    root_expiry_s: float = 365 * 86400.0
    targets_expiry_s: float = 90 * 86400.0
    snapshot_expiry_s: float = 7 * 86400.0
    timestamp_expiry_s: float = 1 * 86400.0

    def __post_init__(self) -> None:
        for name in ("root_threshold", "targets_threshold"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("root_expiry_s", "targets_expiry_s", "snapshot_expiry_s", "timestamp_expiry_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    def expiry(self, role: str, now_s: float) -> datetime:
        seconds = getattr(self, f"{role}_expiry_s")
        return _utc(now_s) + timedelta(seconds=seconds)


def _utc(now_s: float) -> datetime:
    return datetime.fromtimestamp(int(now_s), tz=UTC)


class TufRepo:
    """Signing-side view of one repository directory plus its online key store.

    ``keys`` None: a read-only view (the director reads the image repository's committed targets).
    ``root_only``: the repository holds root alone (the director's shared root).
    """

    def __init__(self, repo_dir: Path, keys: KeyStore | None, policy: RepoPolicy, root_only: bool = False) -> None:
        self.repo_dir = Path(repo_dir)
        self.metadata_dir = self.repo_dir / "metadata"
        self.targets_dir = self.repo_dir / "targets"
        self._keys = keys
        self.policy = policy
        self.root_only = root_only

    @property
    def keys(self) -> KeyStore:
        if self._keys is None:
            raise OtaError(f"{self.repo_dir} is opened read-only: no keys to sign with")
        return self._keys

    @property
    def pending(self) -> KeyStore:
        """Online keys generated for a root not imported yet."""
        return KeyStore(self.keys.keys_dir / "pending")

    # -- reading the committed state -------------------------------------------------------
    def root_version(self) -> int:
        versions = [int(p.name.split(".")[0]) for p in self.metadata_dir.glob("*.root.json")]
        return max(versions, default=0)

    def load_root(self, version: int | None = None) -> Metadata[Root]:
        v = self.root_version() if version is None else version
        return self._load(f"{v}.root.json", Root)

    def load_timestamp(self) -> Metadata[Timestamp]:
        return self._load("timestamp.json", Timestamp)

    def load_snapshot(self) -> Metadata[Snapshot]:
        return self._load(f"{self.load_timestamp().signed.snapshot_meta.version}.snapshot.json", Snapshot)

    def load_targets(self) -> Metadata[Targets]:
        version = self.load_snapshot().signed.meta["targets.json"].version
        return self._load(f"{version}.targets.json", Targets)

    def _load(self, name: str, cls: type) -> Metadata:
        path = self.metadata_dir / name
        try:
            md = Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError as e:
            raise OtaError(f"TUF repository {self.repo_dir} is missing {name}; run a release to initialise it") from e
        except Exception as e:  # tuf raises DeserializationError and friends
            raise OtaError(f"TUF metadata {path} is unreadable: {e}") from e
        if not isinstance(md.signed, cls):
            raise OtaError(f"{path} holds {md.signed.type} metadata, expected {cls.__name__.lower()}")
        return md

    def active_keyids(self, root: Root | None = None) -> dict[str, list[str]]:
        r = root or self.load_root().signed
        return {role: list(r.roles[role].keyids) for role in ROLES}

    # -- writing ---------------------------------------------------------------------------
    def _sign(self, md: Metadata, role: str, root: Root) -> None:
        """Sign with every key of ``role`` held here; fewer than its threshold is an error, not a
        repository clients would reject."""
        md.signatures.clear()
        held = [k for k in root.roles[role].keyids if self.keys.has(role, k)]
        if len(held) < root.roles[role].threshold:
            raise OtaError(f"{role} needs {root.roles[role].threshold} signatures but only {len(held)} of its "
                           f"keys are in {self.keys.keys_dir}")
        for keyid in held:
            md.sign(self.keys.signer(role, keyid), append=True)

    def write_root(self, md: Metadata[Root]) -> None:
        data = md.to_bytes(_SERIALIZER)
        write_atomic(self.metadata_dir / f"{md.signed.version}.root.json", data)  # commit point
        write_atomic(self.metadata_dir / "root.json", data)  # convenience copy for bootstrapping

    def initialise(self, now_s: float) -> None:
        """Bring an imported root's repository to a consistent, published state (idempotent)."""
        remove_stale_temps(self.metadata_dir)
        if self.root_version() == 0:
            raise OtaError(f"TUF repository {self.repo_dir} has no root: sign one offline and import it "
                           "(driveloop ota keys export / sign-root / import-root)")
        if self.root_only:
            return
        if not (self.metadata_dir / "timestamp.json").exists():
            self.publish({}, 0, now_s)
        self.recover(now_s)

    def import_root(self, data: bytes, now_s: float) -> int:
        """Install root metadata signed offline; returns its version (idempotent for the current root).

        Accepted only as the next link of the chain clients follow: version N+1, signed by the threshold
        of root N and of itself, unexpired, and listing online keys this server holds (in ``pending/``
        or already active). The root file is the commit point; the other roles are re-signed under it.
        """
        md = _parse_root(data)
        new = md.signed
        current = self.load_root() if self.root_version() else None
        if current is not None and new.version <= current.signed.version:
            if new.version == current.signed.version and md.signed_bytes == current.signed_bytes:
                return new.version  # already imported
            raise RollbackAttackError(f"root v{new.version} is not newer than the current root v{current.signed.version}")
        expected = current.signed.version + 1 if current is not None else 1
        if new.version != expected:
            raise OtaError(f"root v{new.version} does not follow the current root: import v{expected} first")
        for signer_root, who in ((current.signed if current else None, "the current root"), (new, "itself")):
            if signer_root is None:
                continue
            try:
                signer_root.verify_delegate("root", md.signed_bytes, md.signatures)
            except tuf_exc.UnsignedMetadataError as e:
                raise SignatureError(f"root v{new.version} is not signed by the threshold of {who}: {e}") from e
        if new.is_expired(_utc(now_s)):
            raise OtaError(f"root v{new.version} expired at {new.expires.isoformat()}")
        if not new.consistent_snapshot:
            raise OtaError("root must enable consistent snapshots (resumable, content-addressed targets)")
        adopt: list[tuple[str, str]] = []
        for role in ONLINE_ROLES:
            held = [k for k in new.roles[role].keyids if self.keys.has(role, k) or self.pending.has(role, k)]
            if len(held) < new.roles[role].threshold:
                raise OtaError(f"root v{new.version} lists {role} keys whose private keys are not in "
                               f"{self.keys.keys_dir}: export the online keys of this server first")
            adopt += [(role, k) for k in held if not self.keys.has(role, k)]
        for role, keyid in adopt:  # copies: a crash before the commit below loses no key
            self.keys.adopt(self.pending, role, keyid)
        self.write_root(md)  # commit point
        if not self.root_only:
            entries, prev = self._committed_targets()
            self.publish(entries, prev, now_s)
        for role, keyid in adopt:
            self.pending.discard(role, keyid)
        with contextlib.suppress(OSError):  # tidy: only while nothing else waits there
            self.pending.keys_dir.rmdir()
        self.keys.prune(self.active_keyids(new))
        logger.info("imported root v%d into %s", new.version, self.repo_dir)
        return new.version

    def publish(self, entries: dict[str, TargetFile], prev_version: int, now_s: float,
                custom: dict[str, object] | None = None) -> int:
        """Sign ``entries`` as targets version ``prev_version + 1``, then snapshot and timestamp.

        ``custom`` goes into the signed targets (the director names the vehicle they are for).
        Returns the new targets version; the timestamp write is the commit point.
        """
        root = self.load_root().signed
        old_ts = self._try_load_timestamp()
        snap_version = old_ts.signed.snapshot_meta.version if old_ts else 0
        ts_version = old_ts.signed.version if old_ts else 0

        targets = Targets(version=prev_version + 1, expires=self.policy.expiry("targets", now_s), targets=entries,
                          unrecognized_fields={"custom": dict(custom)} if custom else None)
        t_md = Metadata(targets)
        self._sign(t_md, "targets", root)
        write_atomic(self.metadata_dir / f"{targets.version}.targets.json", t_md.to_bytes(_SERIALIZER))

        snapshot = Snapshot(version=snap_version + 1, expires=self.policy.expiry("snapshot", now_s))
        snapshot.meta["targets.json"] = MetaFile(version=targets.version)
        s_md = Metadata(snapshot)
        self._sign(s_md, "snapshot", root)
        write_atomic(self.metadata_dir / f"{snapshot.version}.snapshot.json", s_md.to_bytes(_SERIALIZER))

        self._write_timestamp(ts_version + 1, snapshot.version, self.policy.expiry("timestamp", now_s), root)
        logger.info("published targets v%d snapshot v%d", targets.version, snapshot.version)
        return targets.version

    def _write_timestamp(self, version: int, snapshot_version: int, expires: datetime, root: Root) -> None:
        ts = Timestamp(version=version, expires=expires, snapshot_meta=MetaFile(version=snapshot_version))
        md = Metadata(ts)
        self._sign(md, "timestamp", root)
        write_atomic(self.metadata_dir / "timestamp.json", md.to_bytes(_SERIALIZER))  # commit point

    def _try_load_timestamp(self) -> Metadata[Timestamp] | None:
        if not (self.metadata_dir / "timestamp.json").exists():
            return None
        return self.load_timestamp()

    def refresh_timestamp(self, expires: datetime) -> int:
        """Re-sign the timestamp with a new expiry (and the next version); returns that version."""
        root = self.load_root().signed
        old = self.load_timestamp().signed
        self._write_timestamp(old.version + 1, old.snapshot_meta.version, expires, root)
        return old.version + 1

    def recover(self, now_s: float) -> bool:
        """Bring a repository back to a consistent state after a crash; True if it had to re-publish.

        Consistent means: the committed timestamp, snapshot and targets verify under the latest root.
        A crash between writing a new root and re-signing the other roles breaks that, so re-publish.
        Keys the latest root no longer lists (revoked, or orphaned by a crash) are destroyed.
        """
        remove_stale_temps(self.metadata_dir)
        root = self.load_root().signed
        consistent = True
        try:
            for role, md in (
                ("timestamp", self.load_timestamp()),
                ("snapshot", self.load_snapshot()),
                ("targets", self.load_targets()),
            ):
                root.verify_delegate(role, md.signed_bytes, md.signatures)
        except (OtaError, tuf_exc.RepositoryError, ValueError, KeyError) as e:  # unreadable or badly signed
            logger.warning("repository inconsistent after a crash or rotation (%s); re-publishing", e)
            consistent = False
        if not consistent:
            entries, prev = self._committed_targets()
            self.publish(entries, prev, now_s)
        self.keys.prune(self.active_keyids(root))
        return not consistent

    def highest_targets_version(self) -> int:
        """Committed or not: a new publish never reuses a version number a client may have seen."""
        return max((int(p.name.split(".")[0]) for p in self.metadata_dir.glob("*.targets.json")), default=0)

    def _committed_targets(self) -> tuple[dict[str, TargetFile], int]:
        """Entries of the committed targets (its content is ours, only its signature may be stale)
        and the highest targets version on disk, so a re-publish never reuses a version number."""
        highest = self.highest_targets_version()
        try:
            return dict(self.load_targets().signed.targets), highest
        except OtaError:
            return {}, highest


def _parse_root(data: bytes) -> Metadata[Root]:
    try:
        md = Metadata.from_bytes(data)
    except Exception as e:  # tuf raises DeserializationError and friends
        raise OtaError(f"root metadata to import is unreadable: {e}") from e
    if not isinstance(md.signed, Root):
        raise OtaError(f"metadata to import holds {md.signed.type}, expected root")
    return md
