"""Releasing the fastest form of a model: of a model and its compressed variants, the fastest one that
passed its gates ships, and the manifest a vehicle downloads says which variant it runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from driveloop.contracts.manifest import parse_manifest
from driveloop.core.exceptions import OtaError
from driveloop.ota.release import ReleaseService, RepoPolicy, choose_variant
from tests.fakes.tuf_repo import FakeRegistry, tiny_policy_onnx, tuf_client

NOW_S = float(int(time.time()))


def _manifest(parent: str | int | None, b1: Any = 0.6, fleet: Any = 0.5, latency_passed: Any = True,
              method: str = "distill") -> dict[str, Any]:
    return {"variant": None if parent is None else {"method": method, "parent": parent},
            "metrics": {"latency": {"passed": latency_passed}, "latency_ratio_b1": b1, "latency_ratio_fleet": fleet}}


# variants of model "1" as (version, stage, manifest) -> the version that ships
CHOICES = {
    "no variants: the model itself": ([], "1"),
    "one validated variant": ([("2", "validated", _manifest(1))], "2"),
    "the fastest at batch 1 wins": ([("2", "validated", _manifest(1, 0.7, 0.3)), ("3", "validated", _manifest(1, 0.6, 0.5))], "3"),
    "fleet ratio breaks a tie": ([("2", "validated", _manifest(1, 0.6, 0.5)), ("3", "validated", _manifest(1, 0.6, 0.4))], "3"),
    "then the lower version": ([("3", "validated", _manifest(1)), ("2", "validated", _manifest(1))], "2"),
    "a rejected variant never ships": ([("2", "rejected", _manifest(1, 0.1, 0.1)), ("3", "validated", _manifest(1, 0.7))], "3"),
    "a candidate never ships": ([("2", "candidate", _manifest(1, 0.1, 0.1))], "1"),
    "latency gate not passed": ([("2", "validated", _manifest(1, 0.5, 0.5, latency_passed=False))], "1"),
    "slower than the parent": ([("2", "validated", _manifest(1, 1.2, 0.9))], "1"),
    "a variant of another model": ([("2", "validated", _manifest(7))], "1"),
    "not a variant at all": ([("2", "validated", _manifest(None))], "1"),
    "no measured ratio": ([("2", "validated", _manifest(1, None, 0.5))], "1"),
    "a ratio that is not a number": ([("2", "validated", _manifest(1, "0.5", 0.5))], "1"),
    "an infinite ratio": ([("2", "validated", _manifest(1, float("inf"), 0.5))], "1"),
    "already released": ([("2", "released", _manifest(1, 0.6, 0.5, method="int8"))], "2"),
}


@pytest.mark.parametrize(("variants", "ships"), CHOICES.values(), ids=CHOICES.keys())
def test_choose_variant(variants: list[tuple[str, str, dict[str, Any]]], ships: str) -> None:
    choice = choose_variant("1", variants)
    assert choice.version == ships and choice.parent == "1"
    assert [r["version"] for r in choice.considered] == [v for v, _, _ in variants]
    if ships == "1":
        assert choice.variant is None and choice.latency_ratio_b1 == 1.0
    else:
        assert choice.variant == next(m for v, _, m in variants if v == ships)["variant"]
        assert next(r for r in choice.considered if r["version"] == ships)["eligible"]


@pytest.fixture
def registry(tmp_path: Path) -> Any:
    """A real registry: v1 (validated), v2 a distilled variant (x0.65), v3 an INT8 variant (rejected, x1.6),
    v4 a second distilled variant (x0.75), v5 another validated model with no variants."""
    from driveloop.cloud.registry import Registry

    reg = Registry(tmp_path / "registry")
    for seed, (parent, stage, m) in enumerate([
        (None, "validated", None), (1, "validated", _manifest(1, 0.65, 0.5)),
        (1, "rejected", _manifest(1, 1.6, 1.4, latency_passed=False, method="int8")),
        (1, "validated", _manifest(1, 0.75, 0.45)), (None, "validated", None),
    ], start=1):
        path = tmp_path / f"m{seed}.onnx"
        path.write_bytes(tiny_policy_onnx(seed))
        made = reg.register(path, parent_version=parent, variant=None if m is None else m["variant"],
                            metrics=None if m is None else m["metrics"])
        reg.set_stage(made.version, stage, "fixture")
    yield reg
    reg.close()


def test_release_fastest_ships_the_variant_and_the_vehicle_sees_it(tmp_path: Path, registry: Any) -> None:
    svc = ReleaseService(tmp_path / "repo", tmp_path / "keys", registry, RepoPolicy(), clock=lambda: NOW_S)
    info, choice = svc.release_fastest(1, hardware_class="cpu")
    assert (info.model_version, choice.version, choice.variant) == ("2", "2", {"method": "distill", "parent": 1})
    assert [(r["version"], r["eligible"]) for r in choice.considered] == [("2", True), ("3", False), ("4", True)]
    assert registry.get(2).stage == "released" and registry.get(1).stage == "validated"
    assert info.custom["variant"] == {"method": "distill", "parent": 1}

    client = tuf_client(svc.repo.repo_dir, tmp_path / "vehicle", svc.trusted_root())
    client.refresh()
    target = client.get_targetinfo("models/2/manifest.json")
    manifest = parse_manifest(Path(client.download_target(target, str(tmp_path / "manifest.json"))).read_bytes())
    assert manifest.version == 2 and manifest.variant is not None
    assert (manifest.variant.method, manifest.variant.parent, manifest.parent_version) == ("distill", 1, 1)

    plain, own = svc.release_fastest(5)  # no variants: the model itself, its target without a variant field
    assert (plain.model_version, own.variant) == ("5", None) and "variant" not in plain.custom
    with pytest.raises(OtaError, match="is a variant of 1"):
        svc.release_fastest(4)
    assert svc.release(4).model_version == "4"  # an exact release of a validated variant stays possible


def test_release_fastest_refusals(tmp_path: Path, registry: Any) -> None:
    registry.set_stage(1, "rejected", "gate verdict withdrawn")
    svc = ReleaseService(tmp_path / "repo", tmp_path / "keys", registry, RepoPolicy(), clock=lambda: NOW_S)
    with pytest.raises(OtaError, match="'rejected'"):
        svc.release_fastest(1)
    fake = FakeRegistry(tmp_path / "fake")
    fake.add("1", seed=1)
    with pytest.raises(OtaError, match="cannot list compressed variants"):
        ReleaseService(tmp_path / "other" / "repo", tmp_path / "other" / "keys", fake, RepoPolicy(),
                       clock=lambda: NOW_S).release_fastest("1")


def test_cli_release_default_and_exact(tmp_path: Path, registry: Any, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from driveloop.cli import main

    home = tmp_path  # the fixture's registry is <tmp_path>/registry: this data directory's
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    assert main(["ota", "release", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_version"] == "2" and out["variant"] == {"method": "distill", "parent": 1}
    assert [r["version"] for r in out["variants_considered"]] == ["2", "3", "4"]
    assert main(["ota", "release", "5", "--exact", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_version"] == "5" and out["variant"] is None and "variants_considered" not in out
    assert main(["ota", "release", "4"]) == 9
    assert "is a variant of 1" in capsys.readouterr().err


def test_the_loop_learns_on_from_the_parent_of_a_released_variant(tmp_path: Path, registry: Any) -> None:
    svc = ReleaseService(tmp_path / "repo", tmp_path / "keys", registry, RepoPolicy(), clock=lambda: NOW_S)
    svc.release_fastest(1)
    assert registry.resolve().version == 2  # what vehicles drive: the released variant
    assert registry.learning_base().version == 1  # what the pipeline fine-tunes: its parent
    assert registry.learning_base(5).version == 5
