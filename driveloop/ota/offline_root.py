"""Offline root (TUF): root keys, and the root metadata they sign, live in a folder the server never reads.

The workflow (README "Signing keys: root offline"), the same for the image and the director repository:

1. on the server, :func:`export_online_keys` writes the public keys of the online roles (targets,
   snapshot, timestamp) to a file, generating the keys a new root needs (first setup, a rotation, a
   higher targets threshold) into ``<keys>/pending/``, where they wait, unused, until a root lists them;
2. on the offline machine, :meth:`OfflineRoot.sign` creates the root keys in its folder (first time, or
   ``rotate_root``) and signs root version N+1 with the threshold of root N *and* of itself, as clients
   demand; the folder keeps every root it signed (``roots/N.root.json``), its commit point;
3. back on the server, ``TufRepo.import_root`` checks that chain, adopts the pending keys, re-signs.

:func:`resign_root` runs all three in one process, for a development machine where the offline folder
is at hand (``<home>/ota/offline-root/<repository>``); move that folder off any server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import SSlibKey
from tuf.api.metadata import Metadata, Root

from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import ConfigError, OtaError
from driveloop.ota._tuf_io import repo_lock
from driveloop.ota._tuf_repo import RepoPolicy, TufRepo
from driveloop.ota.keys import ONLINE_ROLES, ROLES, KeyStore, check_role

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_TYPE", "REPOSITORIES", "OfflineRoot", "RepositoryPaths", "export_keys", "export_online_keys",
           "import_root", "keys_summary", "open_repository", "resign_root", "sync_from_offline"]

EXPORT_TYPE = "driveloop-online-keys"
REPOSITORIES = ("image", "director")


@dataclass(frozen=True)
class RepositoryPaths:
    """Where a repository, its online keys and (by default) its offline root live under ``<home>/ota``."""

    repo_dir: Path
    keys_dir: Path
    offline_dir: Path

    @classmethod
    def of(cls, ota_dir: Path, repository: str) -> RepositoryPaths:
        if repository not in REPOSITORIES:
            raise ConfigError(f"unknown repository {repository!r}; expected one of {', '.join(REPOSITORIES)}")
        ota_dir = Path(ota_dir)
        repo, keys = ("repo", "keys") if repository == "image" else ("director", "director-keys")
        return cls(ota_dir / repo, ota_dir / keys, default_offline_dir(ota_dir / keys, repository))


def default_offline_dir(keys_dir: Path, repository: str) -> Path:
    """The development default, beside the online keys folder; production keeps it on offline media."""
    return Path(keys_dir).parent / "offline-root" / repository


def open_repository(ota_dir: Path, repository: str, policy: RepoPolicy | None = None) -> TufRepo:
    """The signing view of ``repository`` under ``ota_dir`` (the director's is its shared root only)."""
    paths = RepositoryPaths.of(ota_dir, repository)
    return TufRepo(paths.repo_dir, KeyStore(paths.keys_dir), policy or RepoPolicy(),
                   root_only=repository == "director")


def keys_summary(repo: TufRepo) -> list[dict[str, Any]]:
    """Role, threshold, version and key ids of the current root (for ``ota keys show``)."""
    if repo.root_version() == 0:
        raise OtaError(f"{repo.repo_dir} has no root yet (driveloop ota keys export / sign-root / import-root)")
    root = repo.load_root().signed
    return [{"role": role, "threshold": root.roles[role].threshold, "keyids": list(root.roles[role].keyids),
             "root_version": root.version, "expires": root.expires.isoformat()} for role in ROLES]


def export_keys(ota_dir: Path, repository: str, rotate: Iterable[str] = (),
                targets_threshold: int | None = None) -> dict[str, Any]:
    """Step 1 on the server's data directory (under the repository's lock)."""
    repo = open_repository(ota_dir, repository)
    with repo_lock(repo.repo_dir / ".lock"):
        return export_online_keys(repo, repository, rotate, targets_threshold)


def import_root(ota_dir: Path, repository: str, data: bytes, now_s: float | None = None) -> int:
    """Step 3 on the server's data directory: verify and install a root signed offline; its version."""
    repo = open_repository(ota_dir, repository)
    with repo_lock(repo.repo_dir / ".lock"):
        return repo.import_root(data, time.time() if now_s is None else now_s)


def _key_doc(key: SSlibKey) -> dict[str, Any]:
    return {"keyid": key.keyid, **key.to_dict()}


def export_online_keys(repo: TufRepo, repository: str, rotate: Iterable[str] = (),
                       targets_threshold: int | None = None) -> dict[str, Any]:
    """Public keys and thresholds of the online roles for the next root (step 1; see the module).

    Roles in ``rotate`` get new keys; a role without keys (first setup) too; keys an interrupted
    earlier export left in ``pending/`` are reused, so a retry signs the same keys.
    """
    rotate = {check_role(r) for r in rotate} - {"root"}
    if targets_threshold is not None and targets_threshold < 1:
        raise ConfigError(f"targets threshold must be >= 1, got {targets_threshold}")
    root = repo.load_root().signed if repo.root_version() else None
    roles: dict[str, Any] = {}
    for role in ONLINE_ROLES:
        threshold = root.roles[role].threshold if root is not None else 1
        if role == "targets" and targets_threshold is not None:
            threshold = targets_threshold
        listed = list(root.roles[role].keyids) if root is not None else []
        keyids = [] if role in rotate else listed
        spare = [k for k in repo.pending.keyids(role) if k not in listed]  # never re-offer an active key
        while len(keyids) < threshold:
            keyids.append(spare.pop(0) if spare else repo.pending.generate(role).public_key.keyid)
        keys = [repo.keys.public_key(role, k) if repo.keys.has(role, k) else repo.pending.public_key(role, k)
                for k in keyids]
        roles[role] = {"threshold": threshold, "keys": [_key_doc(k) for k in keys]}
    return {"type": EXPORT_TYPE, "repository": repository, "root_version": root.version if root else 0,
            "roles": roles}


class OfflineRoot:
    """The offline half: root keys (``keys/``, 0600) and every root they signed (``roots/``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.keys = KeyStore(self.folder / "keys")
        self.roots_dir = self.folder / "roots"

    def versions(self) -> list[int]:
        if not self.roots_dir.is_dir():
            return []
        return sorted(int(p.name.split(".")[0]) for p in self.roots_dir.glob("*.root.json"))

    def root_bytes(self, version: int) -> bytes:
        return (self.roots_dir / f"{version}.root.json").read_bytes()

    def latest(self) -> Metadata[Root] | None:
        versions = self.versions()
        return Metadata.from_bytes(self.root_bytes(versions[-1])) if versions else None

    def can_sign(self) -> bool:
        """True when the folder holds the root keys of its newest root (it can sign the next one)."""
        prev = self.latest()
        return prev is not None and any(self.keys.has("root", k) for k in prev.signed.roles["root"].keyids)

    def sign(self, export: dict[str, Any], now_s: float, expiry_s: float = 365 * 86400.0,
             root_threshold: int | None = None, rotate_root: bool = False) -> bytes:
        """Sign the next root for ``export`` (step 2); returns its bytes, also kept in ``roots/``.

        ``root_threshold`` (default: unchanged, 1 for a first root) is also how many root keys it gets.
        """
        online = _parse_export(export)
        prev = self.latest()
        prev_version = prev.signed.version if prev is not None else 0
        if export.get("root_version", 0) != prev_version:
            raise OtaError(f"the repository is at root v{export.get('root_version')} but {self.folder} last signed "
                           f"v{prev_version}: sign with the folder that signed the repository's root")
        if root_threshold is not None and root_threshold < 1:
            raise ConfigError(f"root threshold must be >= 1, got {root_threshold}")
        root = Root(expires=None, consistent_snapshot=True) if prev is None \
            else Metadata.from_bytes(prev.to_bytes()).signed  # a copy: Root shares lists with its source
        root.version = prev_version + 1
        root.expires = datetime.fromtimestamp(int(now_s), tz=UTC) + timedelta(seconds=expiry_s)
        old_root_ids = list(root.roles["root"].keyids) if prev is not None else []
        threshold = root_threshold or root.roles["root"].threshold
        keep = [] if rotate_root else old_root_ids
        for keyid in old_root_ids:
            if keyid not in keep:
                root.revoke_key(keyid, "root")
        for _ in range(threshold - len(keep)):
            root.add_key(self.keys.generate("root").public_key, "root")
        root.roles["root"].threshold = threshold
        for role, (role_threshold, keys) in online.items():
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            for key in keys:
                root.add_key(key, role)
            root.roles[role].threshold = role_threshold
        md = Metadata(root)
        # TUF root rotation: version N+1 must meet the threshold of root N *and* of itself.
        for keyid in dict.fromkeys(old_root_ids + list(root.roles["root"].keyids)):
            if self.keys.has("root", keyid):
                md.sign(self.keys.signer("root", keyid), append=True)
        for trusted in ([prev.signed] if prev is not None else []) + [root]:
            try:
                trusted.verify_delegate("root", md.signed_bytes, md.signatures)
            except Exception as e:  # tuf's UnsignedMetadataError: keys missing from this folder
                raise OtaError(f"{self.folder} lacks the root keys to sign root v{root.version}: {e}") from e
        data = md.to_bytes()
        write_atomic(self.roots_dir / f"{root.version}.root.json", data)  # commit point (offline side)
        self.keys.prune({"root": list(root.roles["root"].keyids)})  # replaced root keys are destroyed
        logger.info("signed root v%d in %s", root.version, self.folder)
        return data


def _parse_export(export: dict[str, Any]) -> dict[str, tuple[int, list[SSlibKey]]]:
    """The online roles' thresholds and public keys from an export; one clear error if malformed."""
    if not isinstance(export, dict) or export.get("type") != EXPORT_TYPE:
        got = export.get("type") if isinstance(export, dict) else type(export).__name__
        raise OtaError(f"not an online-keys export (type {got!r}, expected {EXPORT_TYPE!r})")
    out: dict[str, tuple[int, list[SSlibKey]]] = {}
    try:
        for role in ONLINE_ROLES:
            spec = export["roles"][role]
            keys = [SSlibKey.from_dict(d["keyid"], {k: v for k, v in d.items() if k != "keyid"}) for d in spec["keys"]]
            threshold = int(spec["threshold"])
            if not 1 <= threshold <= len(keys):
                raise ValueError(f"{role} threshold {threshold} with {len(keys)} keys")
            out[role] = (threshold, keys)
    except (KeyError, TypeError, ValueError) as e:
        raise OtaError(f"malformed online-keys export: {e}") from e
    return out


def sync_from_offline(repo: TufRepo, offline: OfflineRoot, now_s: float) -> int:
    """Import every root the offline folder signed that the repository lacks (an interrupted rotation)."""
    imported = 0
    for version in offline.versions():
        if version > repo.root_version():
            repo.import_root(offline.root_bytes(version), now_s)
            imported += 1
    return imported


def resign_root(repo: TufRepo, offline: OfflineRoot, repository: str, policy: RepoPolicy,
                rotate: Iterable[str] = (), now_s: float | None = None) -> Root:
    """Steps 1–3 in one process: first root (``policy`` thresholds) or a rotation of ``rotate``."""
    now_s = time.time() if now_s is None else now_s
    rotate = [check_role(r) for r in rotate]
    sync_from_offline(repo, offline, now_s)
    first = repo.root_version() == 0
    if not first and not offline.can_sign():
        raise OtaError(f"the root keys are not in {offline.folder}: rotate with the offline workflow "
                       "(driveloop ota keys export / sign-root / import-root)")
    export = export_online_keys(repo, repository, rotate, policy.targets_threshold if first else None)
    data = offline.sign(export, now_s, policy.root_expiry_s, policy.root_threshold if first else None,
                        rotate_root="root" in rotate)
    repo.import_root(data, now_s)
    return repo.load_root().signed
