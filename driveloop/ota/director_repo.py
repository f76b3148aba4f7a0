"""Uptane's director repository: per vehicle, signed targets metadata naming exactly what it must install.

The image repository (:mod:`driveloop.ota.release`) says *what is authentic*; the director says *what
this vehicle installs*, and a vehicle installs only what both agree on (name, sha256, length), so a
compromise of either repository's online keys alone installs nothing it should not.

Layout under ``<home>/ota/director``: ``metadata/N.root.json`` (the director's root, signed offline and
imported like the image repository's) and ``vehicles/<vehicle_id>/metadata/`` — one TUF repository per
vehicle (served at ``/director/<vehicle_id>/``), with copies of the shared root and its own
targets/snapshot/timestamp, signed online with ``<home>/ota/director-keys``. The targets carry
``custom.vehicle_id`` (so another vehicle's metadata is refused) and one model target per role
(``custom.role``: ``active`` or ``shadow``) with the image repository's length and sha256.

Which version a vehicle gets is decided by the pure :func:`driveloop.ota.director.assign`; this module
only signs it. Signing is lazy: :meth:`DirectorRepo.assign` re-signs a vehicle's repository when its
assignment changed, when the root or keys changed, or when its metadata is past half its lifetime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile

from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import OtaError
from driveloop.core.ids import check_vehicle_id
from driveloop.ota._tuf_io import repo_lock
from driveloop.ota._tuf_repo import RepoPolicy, TufRepo
from driveloop.ota.keys import KeyStore
from driveloop.ota.offline_root import (
    OfflineRoot,
    RepositoryPaths,
    default_offline_dir,
    resign_root,
    sync_from_offline,
)
from driveloop.ota.release import model_target_path

logger = logging.getLogger(__name__)

__all__ = ["DIRECTOR_ROLES", "DirectorRepo", "assignment_targets", "image_targets"]

DIRECTOR_ROLES = ("active", "shadow")


def image_targets(image_repo_dir: Path) -> dict[str, TargetFile]:
    """The image repository's committed targets (timestamp → snapshot → targets); the server's side of
    the trust boundary, so read without a signature check. Empty when nothing is published yet."""
    repo = TufRepo(Path(image_repo_dir), None, RepoPolicy())
    if not (repo.metadata_dir / "timestamp.json").exists():
        return {}
    return dict(repo.load_targets().signed.targets)


def assignment_targets(assigned: Mapping[str, str | None], image: Mapping[str, TargetFile]) -> dict[str, TargetFile]:
    """Director targets for ``assigned`` (role → model version): each the image target's name, length
    and sha256, with its role. A version the image repository lacks cannot be installed: it is left out."""
    out: dict[str, TargetFile] = {}
    for role in DIRECTOR_ROLES:
        version = assigned.get(role)
        if version is None:
            continue
        path = model_target_path(version)
        t = image.get(path)
        if t is None:
            logger.warning("director: release %s (%s) is not in the image repository; not assigned", version, role)
            continue
        if path in out:  # the same model in both roles: it actuates
            continue
        out[path] = TargetFile(t.length, {"sha256": t.hashes["sha256"]}, path,
                               {"custom": {"role": role, "model_version": version}})
    return out


class DirectorRepo:
    """Signs per-vehicle director metadata; never holds the root key (see ``offline_root``)."""

    def __init__(self, director_dir: Path, keys_dir: Path, image_repo_dir: Path,
                 policy: RepoPolicy | None = None, clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(director_dir)
        self.keys = KeyStore(Path(keys_dir))
        self.image_repo_dir = Path(image_repo_dir)
        self.policy = policy or RepoPolicy()
        self.clock = clock  # wall clock: vehicles check expiry against theirs
        self.top = TufRepo(self.dir, self.keys, self.policy, root_only=True)
        self.vehicles_dir = self.dir / "vehicles"
        self._warned = False

    @classmethod
    def at(cls, ota_dir: Path, policy: RepoPolicy | None = None,
           clock: Callable[[], float] = time.time) -> DirectorRepo:
        """The director of the data directory's layout (``RepositoryPaths``)."""
        d = RepositoryPaths.of(ota_dir, "director")
        return cls(d.repo_dir, d.keys_dir, RepositoryPaths.of(ota_dir, "image").repo_dir, policy, clock)

    def has_root(self) -> bool:
        return self.top.root_version() > 0

    def trusted_root(self) -> bytes:
        """The director's root metadata bytes: what a vehicle is provisioned with, beside the image root."""
        if not self.has_root():
            raise OtaError(f"the director repository {self.dir} has no root yet")
        return (self.top.metadata_dir / f"{self.top.root_version()}.root.json").read_bytes()

    def _offline(self, offline_dir: Path | None) -> OfflineRoot:
        return OfflineRoot(offline_dir or default_offline_dir(self.keys.keys_dir, "director"))

    def bootstrap(self, offline_dir: Path | None = None) -> None:
        """Development convenience: sign a first root in ``offline_dir`` (default beside the keys folder,
        to be moved offline) when the director has none; finish an interrupted offline rotation."""
        offline = self._offline(offline_dir)
        with repo_lock(self.dir / ".lock"):
            sync_from_offline(self.top, offline, self.clock())
            if not self.has_root():
                resign_root(self.top, offline, "director", self.policy, now_s=self.clock())
                logger.warning("signed a new director root with keys in %s: move that folder offline", offline.folder)

    def rotate_key(self, role: str, offline_dir: Path | None = None) -> list[str]:
        """Replace the director keys of ``role`` (the offline root folder at hand signs the new root);
        each vehicle's repository is re-signed under it on its next update check."""
        with repo_lock(self.dir / ".lock"):
            root = resign_root(self.top, self._offline(offline_dir), "director", self.policy, [role], self.clock())
        return list(root.roles[role].keyids)

    def vehicle_repo(self, vehicle_id: str) -> TufRepo:
        return TufRepo(self.vehicles_dir / check_vehicle_id(vehicle_id), self.keys, self.policy)

    # -- signing ---------------------------------------------------------------------------------
    def assign(self, vehicle_id: str, version: str | None, shadow_version: str | None = None) -> int | None:
        """Sign what the director assigns ``vehicle_id`` (``None``: keep what is installed); returns the
        targets version, or None when the director has no root yet (nothing can be signed)."""
        if not self.has_root():
            if not self._warned:
                logger.warning("the director at %s has no root: vehicles that trust a director get no update "
                               "(driveloop ota keys export/sign-root/import-root --repo director)", self.dir)
                self._warned = True
            return None
        entries = assignment_targets({"active": version, "shadow": shadow_version}, image_targets(self.image_repo_dir))
        return self.publish(vehicle_id, entries)

    def publish(self, vehicle_id: str, entries: dict[str, TargetFile]) -> int:
        """Sign ``entries`` as ``vehicle_id``'s targets unless its committed metadata already says so,
        verifies under the current root and is not past half its lifetime."""
        repo = self.vehicle_repo(vehicle_id)
        custom = {"vehicle_id": vehicle_id}
        with repo_lock(self.dir / "locks" / f"{vehicle_id}.lock"):
            now_s = self.clock()
            self._copy_roots(repo)
            current = self._current(repo, now_s)
            if current is not None and current[1] == entries and current[2] == custom:
                return current[0]
            version = repo.publish(entries, repo.highest_targets_version(), now_s, custom)
        logger.info("director: vehicle %s targets v%d: %s", vehicle_id, version,
                    {t.unrecognized_fields["custom"]["role"]: p for p, t in entries.items()} or "keep installed")
        return version

    def _copy_roots(self, repo: TufRepo) -> None:
        """Every root of the chain into the vehicle's repository (clients walk N.root.json from theirs)."""
        latest = self.top.root_version()
        if repo.root_version() == latest:
            return
        for v in range(1, latest + 1):
            dest = repo.metadata_dir / f"{v}.root.json"
            if not dest.exists():
                write_atomic(dest, (self.top.metadata_dir / f"{v}.root.json").read_bytes())
        write_atomic(repo.metadata_dir / "root.json", (self.top.metadata_dir / f"{latest}.root.json").read_bytes())

    def _current(self, repo: TufRepo, now_s: float) -> tuple[int, dict[str, TargetFile], dict] | None:
        """(version, entries, custom) of the committed targets if they still serve, else None."""
        if not (repo.metadata_dir / "timestamp.json").exists():
            return None
        try:
            root = repo.load_root().signed
            mds = {"timestamp": repo.load_timestamp(), "snapshot": repo.load_snapshot(), "targets": repo.load_targets()}
            for role, md in mds.items():
                root.verify_delegate(role, md.signed_bytes, md.signatures)
        except (OtaError, tuf_exc.RepositoryError, ValueError, KeyError) as e:  # new root or keys, or torn
            logger.info("director: re-signing %s (%s)", repo.repo_dir.name, e)
            return None
        renew_by = datetime.fromtimestamp(int(now_s), tz=UTC) + timedelta(seconds=self.policy.timestamp_expiry_s / 2)
        if any(md.signed.expires <= renew_by for md in mds.values()):
            return None
        targets = mds["targets"].signed
        return targets.version, dict(targets.targets), dict(targets.unrecognized_fields.get("custom", {}))
