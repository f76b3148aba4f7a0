"""The vehicle's OTA client: TUF-verified downloads into the inactive A/B slot, trial boots, commit/revert.

Layout under ``vehicle_dir``: ``boot.json`` (the :mod:`_slots` state, written atomically before it is
acted on), ``slots/{a,b}/{model.onnx,manifest.json}``, ``tuf/`` (trusted metadata, python-tuf's cache)
and ``downloads/`` (resumable partial files). The decisions live in the pure state machine; this module
only verifies, moves bytes and persists state.

Rejected (the vehicle keeps running its verified model): anything python-tuf rejects (bad or revoked
signatures, metadata or snapshot rollback, mix-and-match, expired/frozen metadata, hash or length
mismatch, endless data), a target for another hardware class, and a release older than the committed one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from driveloop.core.atomic import file_sha256
from driveloop.edge import _slots
from driveloop.core.atomic import FileOps
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


@contextmanager
def tuf_errors(what: str) -> Iterator[None]:
    """Translate python-tuf errors into driveloop's OTA errors with a message that says what happened."""
    try:
        yield
    except tuf_exc.UnsignedMetadataError as e:
        raise SignatureError(f"{what}: metadata not signed by a trusted key ({e})") from e
    except tuf_exc.BadVersionNumberError as e:
        raise RollbackAttackError(f"{what}: metadata version rollback or mix-and-match ({e})") from e
    except tuf_exc.ExpiredMetadataError as e:
        raise OtaError(f"{what}: metadata expired — stale repository or freeze attack ({e})") from e
    except tuf_exc.LengthOrHashMismatchError as e:
        raise SignatureError(f"{what}: bytes do not match the signed length/hashes — tampered ({e})") from e
    except tuf_exc.DownloadLengthMismatchError as e:
        raise OtaError(f"{what}: server sent more data than signed (endless data attack) ({e})") from e
    except tuf_exc.RepositoryError as e:
        raise OtaError(f"{what}: repository metadata rejected ({type(e).__name__}: {e})") from e
    except tuf_exc.DownloadError as e:
        raise OtaError(f"{what}: download failed ({e})") from e


def repo_urls(repo: str | Path) -> tuple[str, str]:
    """Metadata and targets base URLs of a repository given as http(s) URL or a local directory."""
    s = str(repo)
    if not s.startswith(("http://", "https://", "file://")):
        s = Path(s).resolve().as_uri()
    s = s.rstrip("/")
    return f"{s}/metadata/", f"{s}/targets/"


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
    ) -> None:
        if hardware_class not in VEHICLE_HARDWARE:
            raise ConfigError(f"vehicle hardware class must be one of {VEHICLE_HARDWARE}, got {hardware_class!r}")
        self.dir = Path(vehicle_dir)
        self.metadata_url, self.targets_url = repo_urls(repo)
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
    ) -> None:
        """Factory setup: trusted TUF root, the factory model committed in slot a."""
        vdir = Path(vehicle_dir)
        files = FileOps()
        digest = sha256_file(factory_model)
        if manifest.get("sha256") != digest:
            raise IntegrityError(f"factory model sha256 {digest[:12]}… does not match its manifest")
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
    def _trusted_root(self) -> bytes:
        """Newest root python-tuf cached that still parses, else the provisioned anchor.

        python-tuf persists roots without fsync and re-creates its ``root.json`` link on every
        refresh, so after a power cut the cache may be torn or the link missing; the roots it did
        store were verified through the chain before they were written, so the newest intact one is
        a safe bootstrap, and the factory anchor is the last resort.
        """
        history = self.dir / "tuf" / "root_history"
        cached = sorted(history.glob("*.root.json"), key=lambda p: int(p.name.split(".")[0]), reverse=True) \
            if history.is_dir() else []
        for path in cached:
            data = path.read_bytes()
            try:
                Metadata.from_bytes(data)
                return data
            except tuf_exc.RepositoryError:
                logger.warning("cached root %s is unreadable; trying an older one", path.name)
        try:
            return (self.dir / TRUST_ANCHOR).read_bytes()
        except FileNotFoundError as e:
            raise OtaError(f"vehicle {self.dir} has no trusted root; provision it first") from e

    def _updater(self) -> Updater:
        """A fresh python-tuf client (a refresh can happen once per Updater), cached per check."""
        meta = self.dir / "tuf"
        meta.mkdir(parents=True, exist_ok=True)
        with tuf_errors("loading the trusted root"):
            return Updater(str(meta), self.metadata_url, str(self.dir / "downloads"), self.targets_url,
                           self.fetcher, bootstrap=self._trusted_root())

    def check(self, target_version: str | int | None) -> Offer | None:
        """Verify what the director asks for; None if nothing to do, an Offer if it may be installed."""
        if target_version is None or target_version == "":
            return None
        target_version = str(target_version)  # the registry's int versions are published as "3"
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
