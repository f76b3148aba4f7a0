"""The vehicle's OTA client: TUF-verified downloads into the inactive A/B slot, trial boots, commit/revert.

Layout under ``vehicle_dir``: ``boot.json`` (the :mod:`_slots` state, written atomically before it is
acted on), ``slots/{a,b}/{model.onnx,manifest.json}``, ``tuf/`` (trusted metadata, python-tuf's cache)
and ``downloads/`` (resumable partial files). The decisions live in the pure state machine; this module
only verifies, moves bytes and persists state.

Rejected (the vehicle keeps running its verified model): anything python-tuf rejects (bad or revoked
signatures, metadata or snapshot rollback, mix-and-match, expired/frozen metadata, hash or length
mismatch, endless data), a target for another hardware class, and a release older than the committed one.

A vehicle provisioned with a director root (Uptane; :mod:`driveloop.edge.director_client`) also refuses
any release its director does not sign for it in that role, or signs with another sha256 or length than
the image repository: each decision of :meth:`VehicleUpdater.check` — install, switch back, drop a trial
— starts from the director's signed assignment. A vehicle provisioned without one (bench and factory
tests) trusts the image repository alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from driveloop.core.atomic import file_sha256
from driveloop.core.ids import check_vehicle_id
from driveloop.edge import _slots
from driveloop.core.atomic import FileOps
from driveloop.edge._tuf_client import open_updater, repo_urls, tuf_errors
from driveloop.edge.director_client import DIRECTOR_ANCHOR, Directed, DirectorClient, Role, check_agreement
from driveloop.edge.health_window import HealthWindowPolicy, HealthWindowResult
from driveloop.edge.fetcher import ResumableFetcher
from driveloop.core.version import check_model_version_text
from driveloop.core.exceptions import (
    ConfigError,
    IntegrityError,
    OtaError,
    RollbackAttackError,
    SignatureError,
)

logger = logging.getLogger(__name__)

VEHICLE_HARDWARE = ("cpu", "cuda")
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
TRUST_ANCHOR = "trusted_root.json"  # the provisioned root; python-tuf's cache lives in tuf/
IDENTITY = "vehicle.json"  # {"vehicle_id": …}: set at provisioning, checked against the director's metadata

__all__ = ["Offer", "VehicleUpdater", "repo_urls", "sha256_file", "tuf_errors"]


@dataclass(frozen=True)
class Offer:
    """A verified release the director wants this vehicle to run."""

    version: str
    sha256: str
    length: int
    release_seq: int
    hardware_class: str
    custom: dict[str, Any]
    model_target: TargetFile | None  # None: the model is already in the inactive slot (switch back)
    manifest_target: TargetFile | None


sha256_file = file_sha256  # raises FileNotFoundError for a missing slot file (boot() relies on it)


class VehicleUpdater:
    """A/B updater of one vehicle; construct one per process start, call :meth:`boot` first."""

    def __init__(
        self,
        vehicle_dir: Path,
        repo: str | Path,
        fetcher: FetcherInterface | None = None,
        hardware_class: str = "cpu",
        file_ops: FileOps | None = None,
        health_policy: HealthWindowPolicy | None = None,
        director: str | Path | None = None,
    ) -> None:
        if hardware_class not in VEHICLE_HARDWARE:
            raise ConfigError(f"vehicle hardware class must be one of {VEHICLE_HARDWARE}, got {hardware_class!r}")
        self.dir = Path(vehicle_dir)
        self.repo = repo
        self.metadata_url, self.targets_url = repo_urls(repo)
        self.director_url = director  # this vehicle's director repository (URL or directory)
        self.hardware_class = hardware_class
        self.files = file_ops or FileOps()
        self.health_policy = health_policy or HealthWindowPolicy()
        self.fetcher = fetcher or ResumableFetcher(self.dir / "downloads")
        self._tuf: Updater | None = None

    # -- provisioning and state ---------------------------------------------------------------
    @classmethod
    def provision(
        cls,
        vehicle_dir: Path,
        trusted_root: bytes,
        factory_model: Path,
        manifest: dict[str, Any],
        release_seq: int = 0,
        max_boot_attempts: int = 3,
        director_root: bytes | None = None,
        vehicle_id: str | None = None,
    ) -> None:
        """Factory setup: trusted TUF root(s), the factory model committed in slot a.

        ``director_root`` (with the ``vehicle_id`` the director's metadata must name) makes every later
        update need the director's signature as well as the image repository's.
        """
        vdir = Path(vehicle_dir)
        files = FileOps()
        digest = sha256_file(factory_model)
        if manifest.get("sha256") != digest:
            raise IntegrityError(f"factory model sha256 {digest[:12]}… does not match its manifest")
        if director_root is not None:
            identity = {"vehicle_id": check_vehicle_id(vehicle_id)}
            files.write_atomic(vdir / IDENTITY, json.dumps(identity).encode())
            files.write_atomic(vdir / DIRECTOR_ANCHOR, director_root)
        files.write_atomic(vdir / TRUST_ANCHOR, trusted_root)
        files.copy_atomic(factory_model, vdir / "slots" / "a" / MODEL_FILE)
        files.write_atomic(vdir / "slots" / "a" / MANIFEST_FILE, json.dumps(manifest, sort_keys=True).encode())
        state = _slots.initial(str(manifest["version"]), digest, release_seq, max_boot_attempts)
        files.write_atomic(vdir / "boot.json", json.dumps(state.to_dict()).encode())

    def state(self) -> _slots.BootState:
        try:
            return _slots.BootState.from_dict(json.loads((self.dir / "boot.json").read_bytes()))
        except FileNotFoundError as e:
            raise OtaError(f"vehicle {self.dir} is not provisioned (no boot.json)") from e
        except ValueError as e:
            raise OtaError(f"boot state {self.dir / 'boot.json'} is unreadable: {e}") from e

    def _save(self, state: _slots.BootState) -> _slots.BootState:
        self.files.write_atomic(self.dir / "boot.json", json.dumps(state.to_dict()).encode())
        logger.info("vehicle %s: %s", self.dir.name, state.last_event)
        return state

    def slot_path(self, name: str) -> Path:
        return self.dir / "slots" / name / MODEL_FILE

    # -- boot and health window ---------------------------------------------------------------
    def boot(self) -> Path:
        """Pick the model this start runs (counting trial attempts) and verify its bytes."""
        state = self.state()
        for _ in range(3):  # at most: trial slot corrupt, then active corrupt -> fallback
            state, name = _slots.on_boot(state)
            state = self._save(state)
            path = self.slot_path(name)
            slot = state.slot(name)
            try:
                ok = sha256_file(path) == slot.sha256
            except FileNotFoundError:
                ok = False
            if ok:
                return path
            logger.error("slot %s (%s) fails its hash check; marking it failed", name, slot.version)
            state = self._save(_slots.mark_corrupt(state, name))
        raise OtaError(f"vehicle {self.dir}: no slot holds a verified model")

    def report_health(self, result: bool | HealthWindowResult, reason: str = "") -> _slots.BootState:
        """Verdict of the trial's health window: a bool, or the counts judged by ``health_policy``.

        A window without enough ticks yet changes nothing (the trial stays open).
        """
        if isinstance(result, HealthWindowResult):
            verdict, reason = self.health_policy.judge(result)
            if verdict is None:
                logger.info("vehicle %s: health window open: %s", self.dir.name, reason)
                return self.state()
            result = verdict
        return self.commit() if result else self.revert(reason or "health window failed")

    def commit(self) -> _slots.BootState:
        return self._save(_slots.commit(self.state()))

    def revert(self, reason: str = "operator revert") -> _slots.BootState:
        return self._save(_slots.revert(self.state(), reason))

    def switch(self) -> _slots.BootState:
        """Try the freshly installed slot on the next start."""
        return self._save(_slots.request_switch(self.state()))

    # -- check / download / install -----------------------------------------------------------
    def _updater(self) -> Updater:
        """A fresh python-tuf client of the image repository (a refresh can happen once per Updater)."""
        return open_updater(self.dir / "tuf", self.dir / TRUST_ANCHOR, self.repo, self.fetcher, self.dir / "downloads")

    # -- the director (Uptane) ------------------------------------------------------------------
    def director(self) -> Directed | None:
        """The director's signed assignment of this vehicle (refreshed now); None for a vehicle
        provisioned without a director, which trusts the image repository alone."""
        if not (self.dir / DIRECTOR_ANCHOR).exists():
            return None
        if self.director_url is None:
            raise OtaError(f"vehicle {self.dir.name} trusts a director: give the updater its director URL")
        try:
            vehicle_id = str(json.loads((self.dir / IDENTITY).read_bytes())["vehicle_id"])
        except (OSError, ValueError, KeyError) as e:
            raise OtaError(f"vehicle {self.dir.name}: provisioned identity {IDENTITY} is unreadable ({e})") from e
        return DirectorClient(self.dir, self.director_url, vehicle_id, self.fetcher).fetch()

    def assigned(self, version: str | None, shadow_version: str | None) -> tuple[str | None, str | None]:
        """What to run (active, shadow): the director's signed assignment when this vehicle has a
        director, else the fleet server's (unsigned) offer as given."""
        directed = self.director()
        if directed is None:
            return version, shadow_version
        signed = directed.version("active"), directed.version("shadow")
        if signed != (version, shadow_version):
            logger.warning("vehicle %s: the offer says %s, the director signed %s; following the signature",
                           self.dir.name, (version, shadow_version), signed)
        return signed

    def _directed(self, version: str, role: Role) -> TargetFile | None:
        directed = self.director()
        return None if directed is None else directed.require(version, role)

    def check(self, target_version: str | int | None, role: Role = "active") -> Offer | None:
        """Verify what the director asks for; None if nothing to do, an Offer if it may be installed.

        ``role``: ``shadow`` for a model installed to run beside the active one (never switched to here).
        """
        if target_version is None or target_version == "":
            return None
        target_version = str(target_version)  # the registry's int versions are published as "3"
        directed = self._directed(target_version, role)  # raises unless the director signs exactly this
        state = self.state()
        if state.pending and state.slot(state.active).version == target_version:
            # The director wants the committed model (e.g. the rollout was aborted): drop the new one.
            self._save(_slots.revert(state, f"director asks for committed {target_version}"))
            return None
        running = state.slot(state.running)
        if running.version == target_version or (state.pending and state.slot(state.pending).version == target_version):
            return None
        other = state.slot(state.inactive)
        if other.version == target_version and other.status == "failed":
            logger.warning("director offers %s, which already failed on this vehicle; ignoring", target_version)
            return None
        if other.version == target_version and other.status == "ready" and not state.trial:
            # The previous model is still in the other slot (e.g. a rollout was aborted): switch back.
            if directed is not None and directed.hashes.get("sha256") != other.sha256:
                raise SignatureError(f"release {target_version}: the director's signed sha256 differs from the "
                                     f"verified model in slot {state.inactive}")
            return Offer(target_version, other.sha256 or "", 0, other.release_seq, "any", {}, None, None)
        # Checked here, where it becomes a TUF target path (slots above hold versions verified at install):
        try:  # only a canonical version, "3", never "v3", "03" or "../x"
            check_model_version_text(target_version)
        except ConfigError as e:
            raise OtaError(f"the director's target is not a release: {e}") from e
        self._tuf = self._updater()
        with tuf_errors(f"checking release {target_version}"):
            self._tuf.refresh()
            model_t = self._tuf.get_targetinfo(f"models/{target_version}/model.onnx")
            manifest_t = self._tuf.get_targetinfo(f"models/{target_version}/manifest.json")
        if model_t is None or manifest_t is None:
            raise OtaError(f"release {target_version} is not in the signed repository")
        if directed is not None:
            check_agreement(target_version, directed, model_t)
        custom = dict(model_t.unrecognized_fields.get("custom", {}))
        hw = custom.get("hardware_class")
        if hw not in ("any", self.hardware_class):
            raise OtaError(f"release {target_version} is built for hardware class {hw!r}; this vehicle is {self.hardware_class!r}")
        seq = int(custom.get("release_seq", 0))
        if seq <= state.committed_seq:
            raise RollbackAttackError(
                f"release {target_version} (#{seq}) is not newer than the committed release #{state.committed_seq}"
            )
        if custom.get("sha256") != model_t.hashes.get("sha256"):
            raise SignatureError(f"release {target_version}: signed custom sha256 disagrees with the target hash")
        return Offer(target_version, model_t.hashes["sha256"], model_t.length, seq, hw, custom, model_t, manifest_t)

    def download_and_install(self, offer: Offer) -> str:
        """Download, verify and write ``offer`` into the inactive slot; returns the slot name."""
        if offer.model_target is None or offer.manifest_target is None:
            return self.state().inactive  # switch-back offer: already installed and verified
        if self._tuf is None:
            raise OtaError("download_and_install needs the Offer from check() of this updater")
        dl = self.dir / "downloads"
        model_dl = dl / f"{offer.sha256}.{MODEL_FILE}"
        manifest_dl = dl / f"{offer.sha256}.{MANIFEST_FILE}"
        with tuf_errors(f"downloading release {offer.version}"):
            self._tuf.download_target(offer.model_target, str(model_dl))
            self._tuf.download_target(offer.manifest_target, str(manifest_dl))
        try:
            manifest = json.loads(manifest_dl.read_bytes())
        except ValueError as e:
            raise IntegrityError(f"release {offer.version}: manifest is not JSON ({e})") from e
        if manifest.get("sha256") != offer.sha256 or str(manifest.get("version")) != offer.version:
            raise IntegrityError(f"release {offer.version}: manifest sha256/version disagree with the signed target")
        # Only verified bytes claim the inactive slot: a rejected download leaves the state untouched.
        state, name = _slots.begin_install(self.state(), offer.version, offer.sha256, offer.release_seq)
        state = self._save(state)
        slot_dir = self.dir / "slots" / name
        self.files.copy_atomic(model_dl, slot_dir / MODEL_FILE)
        self.files.copy_atomic(manifest_dl, slot_dir / MANIFEST_FILE)
        if sha256_file(slot_dir / MODEL_FILE) != offer.sha256:
            raise IntegrityError(f"slot {name}: written model does not match the signed hash")
        self._save(_slots.finish_install(state, name, offer.version, offer.sha256))
        for p in (model_dl, manifest_dl):
            self.files.remove(p)
        return name

    def update(self, target_version: str | int | None) -> bool:
        """check → download_and_install → switch in one call; True if a new slot is pending."""
        offer = self.check(target_version)
        if offer is None:
            return False
        self.download_and_install(offer)
        self.switch()
        return True
