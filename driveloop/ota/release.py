"""Signed model releases: a validated registry model becomes a TUF target the fleet can verify.

Rules kept here:
- only a ``validated`` (or already ``released``) model is published, and its ONNX bytes must match the
  manifest's sha256 — nothing reaches a vehicle without the eval gate and a signature;
- each release adds two targets, ``models/<version>/model.onnx`` (custom: name, model_version, sha256,
  input contract, hardware_class, release_seq) and ``models/<version>/manifest.json``;
- ``release_seq`` increases with every new release, so vehicles detect an older model offered as new
  (rollback) regardless of how versions are spelled;
- ``release_fastest`` ships, of a model and its compressed variants (distilled, INT8: manifests with
  ``variant`` {method, parent}), the fastest one that passed its gates (``choose_variant``, pure); the
  manifest target then names the variant, so a vehicle knows which form of the model it runs;
- releasing the same version again is a no-op that returns the existing target (idempotent); a crash
  anywhere leaves the previous consistent repository (see ``_tuf_repo``) and can simply be retried;
- the root key is never in the online keys folder: root is signed in an offline folder
  (:mod:`driveloop.ota.offline_root`). A repository without a root gets one signed in
  ``offline_root`` (default ``<keys>/../offline-root/image``: move it offline), and key rotations
  need that folder at hand, or the offline workflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from tuf.api.metadata import TargetFile

from driveloop.core.atomic import write_atomic
from driveloop.core.exceptions import ConfigError, IntegrityError, OtaError
from driveloop.core.version import model_version_text
from driveloop.ota._tuf_io import repo_lock
from driveloop.ota._tuf_repo import RepoPolicy, TufRepo
from driveloop.ota.keys import KeyStore, check_role
from driveloop.ota.offline_root import OfflineRoot, default_offline_dir, keys_summary, resign_root, sync_from_offline

logger = logging.getLogger(__name__)

HARDWARE_CLASSES = ("cpu", "cuda", "any")
RELEASABLE_STAGES = ("validated", "released")


class _Artifact(Protocol):
    onnx_path: Path
    manifest: Any
    stage: str


class RegistryLike(Protocol):
    """The slice of ``cloud.registry.Registry`` a release needs."""

    def get(self, version: Any) -> _Artifact: ...

    def set_stage(self, version: Any, stage: str, reason: str) -> Any: ...


class VariantRegistryLike(RegistryLike, Protocol):
    """A registry that also lists a model's compressed variants (``release_fastest`` needs it)."""

    def variants(self, version: int) -> list[_Artifact]: ...


@dataclass(frozen=True)
class VariantChoice:
    """Which form of a model ships: the parent itself or one of its variants, and why."""

    version: str
    parent: str
    variant: dict[str, Any] | None  # the shipped manifest's {method, parent}; None for the parent itself
    latency_ratio_b1: float
    latency_ratio_fleet: float
    considered: list[dict[str, Any]] = field(default_factory=list)  # every variant with its verdict


def _variant_row(version: str, stage: str, manifest: dict[str, Any], parent: str) -> dict[str, Any]:
    """One variant's eligibility: releasable stage, really a variant of ``parent``, latency gate passed."""
    metrics = manifest.get("metrics") or {}
    variant = manifest.get("variant") or {}
    ratios = (metrics.get("latency_ratio_b1"), metrics.get("latency_ratio_fleet"))
    finite = all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < float("inf") for r in ratios)
    declared = variant.get("parent")
    checks = {
        f"stage {stage}": stage not in RELEASABLE_STAGES,
        f"not a variant of {parent}": declared is None or model_version_text(declared) != parent,
        "latency gate not passed": (metrics.get("latency") or {}).get("passed") is not True,
        "no measured latency ratios": not finite,
    }
    reasons = [text for text, bad in checks.items() if bad]
    return {"version": version, "method": variant.get("method"), "stage": stage,
            "latency_ratio_b1": ratios[0] if finite else None, "latency_ratio_fleet": ratios[1] if finite else None,
            "eligible": not reasons, "reasons": reasons}


def choose_variant(parent: str, variants: list[tuple[str, str, dict[str, Any]]]) -> VariantChoice:
    """The fastest eligible form of ``parent`` (its variants as (version, stage, manifest) rows).

    Fastest: the lowest batch-1 p50 ratio to the parent (a vehicle runs batch 1), then the fleet ratio,
    then the lower version. The parent itself (ratio 1.0) ships when no variant is eligible.
    """
    rows = [_variant_row(v, stage, m, parent) for v, stage, m in variants]
    eligible = [r for r in rows if r["eligible"] and r["latency_ratio_b1"] < 1.0]
    if not eligible:
        return VariantChoice(parent, parent, None, 1.0, 1.0, rows)
    best = min(eligible, key=lambda r: (r["latency_ratio_b1"], r["latency_ratio_fleet"], int(r["version"])))
    manifest = next(m for v, _, m in variants if v == best["version"])
    return VariantChoice(best["version"], parent, dict(manifest["variant"]), best["latency_ratio_b1"],
                         best["latency_ratio_fleet"], rows)


@dataclass(frozen=True)
class TargetInfo:
    """What a release published: the model target and its manifest target."""

    model_version: str
    path: str
    manifest_path: str
    length: int
    sha256: str
    hardware_class: str
    release_seq: int
    targets_version: int
    custom: dict[str, Any] = field(default_factory=dict)


def model_target_path(version: str) -> str:
    return f"models/{version}/model.onnx"


def manifest_target_path(version: str) -> str:
    return f"models/{version}/manifest.json"


def manifest_dict(manifest: Any) -> dict[str, Any]:
    """A manifest (pydantic model or mapping) as plain JSON data."""
    if hasattr(manifest, "model_dump"):
        return manifest.model_dump(mode="json")
    if isinstance(manifest, dict):
        return dict(manifest)
    raise OtaError(f"unsupported manifest type {type(manifest).__name__}")


class ReleaseService:
    """Publishes registry models into the TUF repository and manages its signing keys."""

    def __init__(
        self,
        repo_dir: Path,
        keys_dir: Path,
        registry: RegistryLike,
        policy: RepoPolicy | None = None,
        clock: Callable[[], float] = time.time,
        offline_root: Path | None = None,
    ) -> None:
        self.repo = TufRepo(Path(repo_dir), KeyStore(Path(keys_dir)), policy or RepoPolicy())
        self.offline = OfflineRoot(offline_root or default_offline_dir(Path(keys_dir), "image"))
        self.registry = registry
        self.clock = clock
        self._lock_path = Path(repo_dir) / ".lock"
        with repo_lock(self._lock_path):
            sync_from_offline(self.repo, self.offline, self.clock())  # finishes an interrupted rotation
            if self.repo.root_version() == 0:
                resign_root(self.repo, self.offline, "image", self.repo.policy, now_s=self.clock())
                logger.warning("signed a new TUF root with keys in %s: move that folder offline", self.offline.folder)
            self.repo.initialise(self.clock())

    # -- queries ---------------------------------------------------------------------------
    def trusted_root(self) -> bytes:
        """The current root metadata bytes: what a vehicle is provisioned with."""
        return (self.repo.metadata_dir / f"{self.repo.root_version()}.root.json").read_bytes()

    def releases(self) -> list[TargetInfo]:
        """Every published model target, oldest release first."""
        targets = self.repo.load_targets().signed
        out = [
            self._info(t, targets.version)
            for t in targets.targets.values()
            if t.path.endswith("/model.onnx")
        ]
        return sorted(out, key=lambda i: i.release_seq)

    def keys_summary(self) -> list[dict[str, Any]]:
        """Role, threshold, version and key ids of the current root (for ``ota keys show``)."""
        return keys_summary(self.repo)

    @staticmethod
    def _info(t: TargetFile, targets_version: int) -> TargetInfo:
        c = dict(t.unrecognized_fields.get("custom", {}))
        return TargetInfo(
            model_version=c["model_version"],
            path=t.path,
            manifest_path=manifest_target_path(c["model_version"]),
            length=t.length,
            sha256=t.hashes["sha256"],
            hardware_class=c["hardware_class"],
            release_seq=int(c["release_seq"]),
            targets_version=targets_version,
            custom=c,
        )

    # -- mutations -------------------------------------------------------------------------
    def release(self, version: str | int, hardware_class: str = "any") -> TargetInfo:
        """Sign and publish a validated model; marks it ``released`` in the registry.

        ``version`` is any reference the registry understands (``3``, ``"v3"``); the target is named
        after the manifest's own version.
        """
        if hardware_class not in HARDWARE_CLASSES:
            raise ConfigError(f"hardware class must be one of {', '.join(HARDWARE_CLASSES)}, got {hardware_class!r}")
        artifact = self.registry.get(version)
        manifest = manifest_dict(artifact.manifest)
        canonical = model_version_text(manifest.get("version"))  # names the TUF target path: "3", never "v3"
        if artifact.stage not in RELEASABLE_STAGES:
            raise OtaError(
                f"model {canonical} is {artifact.stage!r}; only a validated model can be released "
                "(it must pass the closed-loop eval gate first)"
            )
        with repo_lock(self._lock_path):
            info = self._publish_model(canonical, hardware_class, artifact.onnx_path, manifest)
        if artifact.stage != "released":
            self.registry.set_stage(manifest["version"], "released", f"signed TUF release, targets v{info.targets_version}")
        return info

    def release_fastest(self, version: str | int, hardware_class: str = "any") -> tuple[TargetInfo, VariantChoice]:
        """Release the fastest form of ``version`` that passed its gates (``choose_variant``): a validated
        compressed variant when one exists, else the model itself. The parent must be releasable too: a
        variant never ships a model whose own gate verdict was withdrawn."""
        if not hasattr(self.registry, "variants"):
            raise OtaError("this registry cannot list compressed variants; release an exact version instead")
        registry: VariantRegistryLike = self.registry  # type: ignore[assignment]
        artifact = registry.get(version)
        manifest = manifest_dict(artifact.manifest)
        parent = model_version_text(manifest.get("version"))
        if manifest.get("variant"):
            raise OtaError(f"model {parent} is a variant of {model_version_text(manifest['variant'].get('parent'))}; "
                           "release its parent (the fastest form is chosen) or this exact version")
        if artifact.stage not in RELEASABLE_STAGES:
            raise OtaError(f"model {parent} is {artifact.stage!r}; only a validated model (or a variant of one) is released")
        rows = [(model_version_text(manifest_dict(v.manifest).get("version")), v.stage, manifest_dict(v.manifest))
                for v in registry.variants(int(parent))]
        choice = choose_variant(parent, rows)
        logger.info("releasing %s for model %s (%s)", choice.version, parent,
                    "itself" if choice.variant is None else f"{choice.variant['method']} variant, b1 x{choice.latency_ratio_b1:.2f}")
        return self.release(choice.version, hardware_class=hardware_class), choice

    def _publish_model(self, version: str, hardware_class: str, onnx_path: Path, manifest: dict[str, Any]) -> TargetInfo:
        now_s = self.clock()
        targets = self.repo.load_targets().signed
        path = model_target_path(version)
        if path in targets.targets:
            existing = self._info(targets.targets[path], targets.version)
            if existing.hardware_class != hardware_class:
                raise OtaError(
                    f"model {version} is already released for hardware class {existing.hardware_class!r}; "
                    "a release is immutable"
                )
            logger.info("model %s already released (targets v%d)", version, targets.version)
            return existing

        try:
            model_bytes = Path(onnx_path).read_bytes()
        except OSError as e:
            raise OtaError(f"model {version}: cannot read {onnx_path}: {e}") from e
        digest = hashlib.sha256(model_bytes).hexdigest()
        if manifest.get("sha256") != digest:
            raise IntegrityError(
                f"model {version}: ONNX sha256 {digest[:12]}… does not match its manifest ({str(manifest.get('sha256'))[:12]}…)"
            )
        manifest_bytes = json.dumps(manifest, sort_keys=True, indent=2).encode()
        seq = 1 + max((int(t.unrecognized_fields.get("custom", {}).get("release_seq", 0)) for t in targets.targets.values()), default=0)
        custom = {
            "name": manifest.get("name", ""),
            "model_version": version,
            "sha256": digest,
            "hardware_class": hardware_class,
            "release_seq": seq,
            "contract": {"inputs": manifest.get("inputs"), "outputs": manifest.get("outputs")},
            "created_at": manifest.get("created_at"),
        }
        if manifest.get("variant"):  # only then: a plain model's target stays as it always was
            custom["variant"] = dict(manifest["variant"])
        model_t = TargetFile.from_data(path, model_bytes, ["sha256"])
        model_t.unrecognized_fields["custom"] = custom
        man_t = TargetFile.from_data(manifest_target_path(version), manifest_bytes, ["sha256"])
        man_t.unrecognized_fields["custom"] = {"model_version": version, "kind": "manifest"}
        # Content-addressed payloads first: harmless until a timestamp references them.
        for t, data in ((model_t, model_bytes), (man_t, manifest_bytes)):
            self._write_target(t, data)
        entries = dict(targets.targets)
        entries[model_t.path] = model_t
        entries[man_t.path] = man_t
        new_version = self.repo.publish(entries, targets.version, now_s)
        logger.info("released model %s (%s) as release #%d", version, hardware_class, seq)
        return self._info(model_t, new_version)

    def _write_target(self, t: TargetFile, data: bytes) -> None:
        dirname, _, basename = t.path.rpartition("/")
        dest = self.repo.targets_dir / dirname / f"{t.hashes['sha256']}.{basename}"
        if dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == t.hashes["sha256"]:
            return
        write_atomic(dest, data)

    def rotate_key(self, role: str) -> list[str]:
        """Replace the keys of ``role`` (old ones revoked and destroyed); returns the new keyids.

        Needs the offline root folder at hand (it signs the new root); otherwise use the offline workflow.
        """
        check_role(role)
        with repo_lock(self._lock_path):
            root = resign_root(self.repo, self.offline, "image", self.repo.policy, [role], self.clock())
        return list(root.roles[role].keyids)

    def refresh_timestamp(self, expires: datetime | None = None) -> int:
        """Re-sign the timestamp (next version) expiring at ``expires`` (default: policy lifetime)."""
        with repo_lock(self._lock_path):
            exp = expires or self.repo.policy.expiry("timestamp", self.clock())
            return self.repo.refresh_timestamp(exp)
