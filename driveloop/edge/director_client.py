"""The vehicle's client of the director repository (Uptane): what this vehicle must install, signed.

A vehicle provisioned with a director root (``director_root.json`` beside its image root) runs a second
python-tuf client against its own director repository, ``<fleet server>/director/<vehicle_id>/``, with
its own trusted root and cache (``director/``). The director's targets name this vehicle
(``custom.vehicle_id``) and list at most one model target per role (``custom.role``: ``active``,
``shadow``); the updater installs a release only when this target and the image repository's agree on
name, sha256 and length (:func:`check_agreement`). python-tuf rejects a replayed, frozen or badly
signed director metadata exactly as it does for the image repository.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient.fetcher import FetcherInterface

from driveloop.core.exceptions import OtaError, SignatureError
from driveloop.edge._tuf_client import open_updater, tuf_errors

logger = logging.getLogger(__name__)

__all__ = ["DIRECTOR_ANCHOR", "Directed", "DirectorClient", "Role", "check_agreement"]

DIRECTOR_ANCHOR = "director_root.json"  # the provisioned director root; python-tuf's cache lives in director/
Role = Literal["active", "shadow"]
ROLES: tuple[Role, ...] = ("active", "shadow")


@dataclass(frozen=True)
class Directed:
    """The director's verified assignment of this vehicle: its model target per role."""

    targets_version: int
    targets: dict[str, TargetFile] = field(default_factory=dict)

    def version(self, role: Role) -> str | None:
        t = self.targets.get(role)
        return None if t is None else str(t.unrecognized_fields["custom"]["model_version"])

    def require(self, version: str, role: Role) -> TargetFile:
        """The director's target for ``version`` in ``role``; an error if it assigns anything else."""
        t = self.targets.get(role)
        if t is None or self.version(role) != version:
            raise OtaError(f"the director does not assign release {version} as {role} to this vehicle "
                           f"(its signed {role} release: {self.version(role)})")
        return t


def check_agreement(version: str, directed: TargetFile, image: TargetFile) -> None:
    """Uptane's rule: install only what both repositories sign with the same name, sha256 and length."""
    d = (directed.path, directed.hashes.get("sha256"), directed.length)
    i = (image.path, image.hashes.get("sha256"), image.length)
    if d != i:
        raise SignatureError(f"release {version}: the director and the image repository disagree (director "
                             f"{d[0]} sha256 {str(d[1])[:12]}… {d[2]} bytes, image {i[0]} sha256 {str(i[1])[:12]}… "
                             f"{i[2]} bytes): one of them is compromised")


class DirectorClient:
    """One refresh of this vehicle's director repository per :meth:`fetch`."""

    def __init__(self, vehicle_dir: Path, url: str | Path, vehicle_id: str, fetcher: FetcherInterface) -> None:
        self.dir = Path(vehicle_dir)
        self.url = url
        self.vehicle_id = vehicle_id
        self.fetcher = fetcher

    def fetch(self) -> Directed:
        cache = self.dir / "director"
        tuf = open_updater(cache, self.dir / DIRECTOR_ANCHOR, self.url, self.fetcher)
        with tuf_errors("director"):
            tuf.refresh()
        # python-tuf persists top-level metadata only after verifying it, and refresh() just verified
        # (or re-verified) this file: it is the director's trusted targets, which its API cannot list.
        md = Metadata.from_bytes((cache / "targets.json").read_bytes())
        return self._parse(md.signed)

    def _parse(self, targets: Targets) -> Directed:
        named = targets.unrecognized_fields.get("custom", {}).get("vehicle_id")
        if named != self.vehicle_id:
            raise SignatureError(f"director metadata for another vehicle ({named!r}) served to {self.vehicle_id!r}: "
                                 "mix-and-match")
        out: dict[str, TargetFile] = {}
        for path, t in targets.targets.items():
            custom = t.unrecognized_fields.get("custom", {})
            role, version = custom.get("role"), custom.get("model_version")
            if role not in ROLES or role in out or path != f"models/{version}/model.onnx":
                raise OtaError(f"director target {path!r} is malformed (role {role!r}, release {version!r})")
            out[role] = t
        return Directed(targets.version, out)
