"""The TUF repository on disk: load the committed state, sign and publish new metadata versions.

Layout (consistent snapshots): ``metadata/{N.root.json, root.json, N.targets.json, N.snapshot.json,
timestamp.json}`` and ``targets/<sha256>.<name>``. The commit point of every change is one atomic
rename: ``N.root.json`` for a key change, ``timestamp.json`` for everything else. Files written before
a crash but never referenced by the committed timestamp are invisible to clients and are overwritten
by the next publish, so a crash at any point leaves the previous consistent repository.
"""

from __future__ import annotations

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
from driveloop.core.exceptions import ConfigError, OtaError
from driveloop.ota._tuf_io import remove_stale_temps
from driveloop.ota.keys import ROLES, KeyStore

logger = logging.getLogger(__name__)

_SERIALIZER = JSONSerializer(compact=False)


@dataclass(frozen=True)
class RepoPolicy:
    """Thresholds and metadata lifetimes (seconds) of the repository."""

    root_threshold: int = 1
    root_expiry_s: float = 365 * 86400.0
    targets_expiry_s: float = 90 * 86400.0
    snapshot_expiry_s: float = 7 * 86400.0
    timestamp_expiry_s: float = 1 * 86400.0

    def __post_init__(self) -> None:
        if self.root_threshold < 1:
            raise ConfigError(f"root_threshold must be >= 1, got {self.root_threshold}")
        for name in ("root_expiry_s", "targets_expiry_s", "snapshot_expiry_s", "timestamp_expiry_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    def expiry(self, role: str, now_s: float) -> datetime:
        seconds = getattr(self, f"{role}_expiry_s")
        return _utc(now_s) + timedelta(seconds=seconds)


def _utc(now_s: float) -> datetime:
    return datetime.fromtimestamp(int(now_s), tz=UTC)


class TufRepo:
    """Signing-side view of one repository directory plus its key store."""

    def __init__(self, repo_dir: Path, keys: KeyStore, policy: RepoPolicy) -> None:
        self.repo_dir = Path(repo_dir)
        self.metadata_dir = self.repo_dir / "metadata"
        self.targets_dir = self.repo_dir / "targets"
        self.keys = keys
        self.policy = policy

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
        md.signatures.clear()
        for keyid in root.roles[role].keyids:
            md.sign(self.keys.signer(role, keyid), append=True)

    def write_root(self, md: Metadata[Root]) -> None:
        data = md.to_bytes(_SERIALIZER)
        write_atomic(self.metadata_dir / f"{md.signed.version}.root.json", data)  # commit point
        write_atomic(self.metadata_dir / "root.json", data)  # convenience copy for bootstrapping

    def initialise(self, now_s: float) -> None:
        """Create keys and version-1 metadata if the repository has no root yet (idempotent)."""
        remove_stale_temps(self.metadata_dir)
        if self.root_version() == 0:
            self.keys.prune({})  # keys from an init that crashed before its root existed
            root = Root(expires=self.policy.expiry("root", now_s), consistent_snapshot=True)
            for role in ROLES:
                n = self.policy.root_threshold if role == "root" else 1
                for _ in range(n):
                    root.add_key(self.keys.generate(role).public_key, role)
            root.roles["root"].threshold = self.policy.root_threshold
            md = Metadata(root)
            self._sign(md, "root", root)
            self.write_root(md)
            logger.info("initialised TUF repository at %s", self.repo_dir)
        if not (self.metadata_dir / "timestamp.json").exists():
            self.publish({}, 0, now_s)
        self.recover(now_s)

    def publish(self, entries: dict[str, TargetFile], prev_version: int, now_s: float) -> int:
        """Sign ``entries`` as targets version ``prev_version + 1``, then snapshot and timestamp.

        Returns the new targets version; the timestamp write is the commit point.
        """
        root = self.load_root().signed
        old_ts = self._try_load_timestamp()
        snap_version = old_ts.signed.snapshot_meta.version if old_ts else 0
        ts_version = old_ts.signed.version if old_ts else 0

        targets = Targets(version=prev_version + 1, expires=self.policy.expiry("targets", now_s), targets=entries)
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

    def rotate(self, role: str, now_s: float) -> list[str]:
        """Replace every key of ``role``; the new root is signed by the old and (for root) new keys."""
        old_root = self.load_root().signed
        new_root = self.load_root().signed  # a separate copy: Root.to_dict/from_dict share lists
        old_ids = list(old_root.roles[role].keyids)
        new_signers = [self.keys.generate(role) for _ in old_ids]
        for keyid in old_ids:
            new_root.revoke_key(keyid, role)
        for s in new_signers:
            new_root.add_key(s.public_key, role)
        new_root.version = old_root.version + 1
        new_root.expires = self.policy.expiry("root", now_s)
        md = Metadata(new_root)
        # TUF root rotation: version N+1 must meet the threshold of root N *and* of itself.
        for keyid in old_root.roles["root"].keyids:
            md.sign(self.keys.signer("root", keyid), append=True)
        for keyid in new_root.roles["root"].keyids:
            if keyid not in md.signatures:
                md.sign(self.keys.signer("root", keyid), append=True)
        self.write_root(md)  # commit point of the key change
        entries, prev = self._committed_targets()
        self.publish(entries, prev, now_s)  # re-sign every role under the new root
        self.keys.prune(self.active_keyids(new_root))
        logger.info("rotated %s keys: revoked %s", role, [k[:12] for k in old_ids])
        return [s.public_key.keyid for s in new_signers]

    def recover(self, now_s: float) -> bool:
        """Bring a repository back to a consistent state after a crash; True if it had to re-publish.

        Consistent means: the committed timestamp, snapshot and targets verify under the latest root.
        A crash between writing a new root and re-signing the other roles breaks that, so re-publish.
        Keys the latest root no longer lists (revoked, or orphaned by a crash) are destroyed.
        """
        remove_stale_temps(self.metadata_dir)
        root_md = self.load_root()
        root = root_md.signed
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

    def _committed_targets(self) -> tuple[dict[str, TargetFile], int]:
        """Entries of the committed targets (its content is ours, only its signature may be stale)
        and the highest targets version on disk, so a re-publish never reuses a version number."""
        highest = max((int(p.name.split(".")[0]) for p in self.metadata_dir.glob("*.targets.json")), default=0)
        try:
            return dict(self.load_targets().signed.targets), highest
        except OtaError:
            return {}, highest
