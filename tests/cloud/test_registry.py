"""Registry and manifest: content addressing, versions, the stage machine, lineage, crash safety, tamper checks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from itertools import product
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from driveloop.cloud.export import export_onnx
from driveloop.contracts.manifest import (
    ModelManifest,
    build_manifest,
    parse_manifest,
    read_manifest,
    sha256_file,
    write_manifest,
)
from driveloop.cloud.model import PolicyConfig, PolicyNet
from driveloop.cloud.registry import STAGES, TRANSITIONS, Registry, check_transition
from driveloop.contracts import observation as C
from driveloop.core.exceptions import (
    ConfigError,
    ContractError,
    IntegrityError,
    ModelError,
    NoModelError,
    RegistryError,
)
from tests.cloud.test_postgres import _BIN as _PG_BIN
from tests.cloud.test_postgres import _fresh_database, server  # noqa: F401  (fixture, used via getfixturevalue)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("models")
    return [export_onnx(PolicyNet(PolicyConfig(seed=s)), d / f"m{s}.onnx") for s in range(3)]


_NO_PG = _PG_BIN is None or not (_PG_BIN / "initdb").exists()


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=[pytest.mark.slow, pytest.mark.skipif(
        _NO_PG, reason="PostgreSQL server binaries not installed (Debian package `postgresql`)")])],
)
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> Registry:
    """Every registry test runs on the embedded SQLite index and on a real PostgreSQL server."""
    url = None if request.param == "sqlite" else _fresh_database(request.getfixturevalue("server"))
    with Registry(tmp_path / "registry", db_url=url) as r:
        assert r.db_url.startswith("sqlite" if url is None else "postgresql")
        yield r


# -- manifest -------------------------------------------------------------------------------------------


def test_manifest_round_trip_and_contract(models: list[Path], tmp_path: Path) -> None:
    m = build_manifest(models[0], name="policy", version=1, metrics={"collisions": 0}, training_run={"epochs": 3})
    assert m.sha256 == sha256_file(models[0]) and m.io_matches_contract()
    assert m.inputs == {"kinematics": [C.KIN_DIM], "lidar": [2, 32], "grid": [2, 16, 32]}
    path = write_manifest(m, tmp_path / "manifest.json")
    assert read_manifest(path) == m
    assert json.loads(path.read_text())["metrics"] == {"collisions": 0}
    with pytest.raises(ValidationError):
        m.version = 2  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    "patch",
    [
        {"version": 0},
        {"sha256": "z" * 64},
        {"sha256": "ab"},
        {"created_at": "2026-01-01T00:00:00+02:00"},
        {"created_at": "yesterday"},
        {"name": "../etc"},
        {"surprise": 1},
    ],
    ids=["version-0", "non-hex-sha", "short-sha", "not-utc", "not-iso", "path-name", "unknown-field"],
)
def test_manifest_rejects_bad_fields(models: list[Path], patch: dict) -> None:
    data = json.loads(build_manifest(models[0], name="policy", version=1).to_json()) | patch
    with pytest.raises(ModelError):
        parse_manifest(json.dumps(data))


def test_read_manifest_errors_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        read_manifest(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelError):
        read_manifest(tmp_path / "bad.json")


# -- register / get ---------------------------------------------------------------------------------------


def test_register_assigns_versions_and_stores_content_addressed(reg: Registry, models: list[Path]) -> None:
    m1 = reg.register(models[0], dataset_version="ds-1", training_run={"seed": 0})
    m2 = reg.register(models[1], parent_version=1)
    m3 = reg.register(models[0], parent_version=2)  # same bytes as v1
    assert (m1.version, m2.version, m3.version) == (1, 2, 3)
    blobs = sorted(p.name for p in reg.blobs_dir.iterdir())
    assert blobs == sorted({f"{sha256_file(models[0])}.onnx", f"{sha256_file(models[1])}.onnx"})
    art = reg.get(1)
    assert art.stage == "candidate" and art.onnx_path.read_bytes() == models[0].read_bytes()
    assert read_manifest(art.manifest_path) == m1 == art.manifest
    assert art.manifest.dataset_version == "ds-1" and art.manifest.training_run == {"seed": 0}


def test_registry_persists_across_reopen(tmp_path: Path, models: list[Path]) -> None:
    with Registry(tmp_path / "r") as r:
        r.register(models[0])
        r.set_stage(1, "validated", "eval gate passed")
    with Registry(tmp_path / "r") as r:
        assert [(m.version, stage) for m, stage in r.list()] == [(1, "validated")]


def test_explicit_db_url(tmp_path: Path, models: list[Path]) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with Registry(tmp_path / "r", db_url=url) as r:
        r.register(models[0])
    assert (tmp_path / "elsewhere.db").is_file() and not (tmp_path / "r" / "registry.db").exists()


@pytest.mark.parametrize(
    ("ref", "expected"),
    [(1, 1), ("2", 2), ("v3", 3), ("latest", 4), ("candidate", 4), ("validated", 3), ("released", 2), ("rejected", 1)],
)
def test_get_resolves_refs(reg: Registry, models: list[Path], ref: int | str, expected: int) -> None:
    for _ in range(4):
        reg.register(models[0])
    reg.set_stage(1, "rejected", "bad eval")
    for v in (2, 3):
        reg.set_stage(v, "validated", "eval ok")
    reg.set_stage(2, "released", "signed release")
    assert reg.get(ref).version == expected


@pytest.mark.parametrize("ref", [99, "v99", "revoked", "newest", ""])
def test_get_unknown_refs_raise(reg: Registry, models: list[Path], ref: int | str) -> None:
    reg.register(models[0])
    with pytest.raises(RegistryError):
        reg.get(ref)


@pytest.mark.parametrize("ref", [0, "0", -1, "3x", "vv3", 10**30, "99999999999999999999999", True])
def test_get_bad_versions_are_config_errors(reg: Registry, models: list[Path], ref: int | str) -> None:
    """A malformed or out-of-range number is the caller's mistake (exit 2), never an OverflowError."""
    reg.register(models[0])
    with pytest.raises(ConfigError, match="model version"):
        reg.get(ref)


# (name, stages of v1, v2, v3 after registration, expected version of resolve(None))
RESOLVE = [
    ("released_beats_newer_validated", ("released", "validated", "validated"), 1),
    ("newest_released", ("released", "released", "validated"), 2),
    ("validated_when_none_released", ("validated", "validated", "candidate"), 2),
    ("validated_when_released_revoked", ("revoked", "validated", "candidate"), 2),
]

_PATH = {"validated": ("validated",), "released": ("validated", "released"), "rejected": ("rejected",),
         "revoked": ("validated", "released", "revoked"), "candidate": ()}


def _stage_models(reg: Registry, models: list[Path], stages: tuple[str, ...]) -> None:
    for version, stage in enumerate(stages, start=1):
        reg.register(models[0])
        for step in _PATH[stage]:
            reg.set_stage(version, step, "test")


@pytest.mark.parametrize(("name", "stages", "expected"), RESOLVE, ids=[c[0] for c in RESOLVE])
def test_resolve_default_is_newest_released_else_validated(
    reg: Registry, models: list[Path], name: str, stages: tuple[str, ...], expected: int
) -> None:
    _stage_models(reg, models, stages)
    assert reg.resolve(None).version == expected
    assert reg.resolve("").version == expected
    assert reg.resolve().version == expected


def test_resolve_explicit_ref_is_get(reg: Registry, models: list[Path]) -> None:
    _stage_models(reg, models, ("released", "validated", "candidate"))
    assert [reg.resolve(r).version for r in (3, "3", "v2", "latest", "candidate", "validated")] == [3, 3, 2, 3, 3, 2]
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.resolve(9)


@pytest.mark.parametrize("stages", [(), ("candidate", "rejected", "revoked")], ids=["empty", "nothing_deployable"])
def test_resolve_without_released_or_validated_raises(
    reg: Registry, models: list[Path], stages: tuple[str, ...]
) -> None:
    _stage_models(reg, models, stages)
    with pytest.raises(NoModelError, match="no released or validated model"):
        reg.resolve(None)


def test_register_refuses_missing_file_unknown_parent_and_non_contract_models(
    reg: Registry, models: list[Path], tmp_path: Path
) -> None:
    with pytest.raises(RegistryError):
        reg.register(tmp_path / "absent.onnx")
    with pytest.raises(RegistryError, match="parent"):
        reg.register(models[0], parent_version=7)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(ContractError):
        reg.register(junk)

    class WrongGrid(torch.nn.Module):
        def forward(self, kinematics: torch.Tensor, lidar: torch.Tensor, grid: torch.Tensor) -> tuple:
            return kinematics[:, :2], grid.mean(dim=(1, 2, 3)).unsqueeze(1)

    wrong = tmp_path / "wrong.onnx"
    torch.onnx.export(
        WrongGrid(), (torch.zeros(1, C.KIN_DIM), torch.zeros(1, 2, 32), torch.zeros(1, 2, 8, 8)), str(wrong),
        input_names=list(C.INPUT_NAMES), output_names=list(C.OUTPUT_NAMES),
        dynamic_axes={n: {0: "batch"} for n in (*C.INPUT_NAMES, *C.OUTPUT_NAMES)}, dynamo=False,
    )
    with pytest.raises(ContractError, match="inputs"):
        reg.register(wrong)
    assert reg.list() == []


# -- stage machine ----------------------------------------------------------------------------------------

_ALLOWED = {
    ("candidate", "validated"), ("candidate", "rejected"),
    ("validated", "released"), ("validated", "rejected"),
    ("released", "revoked"),
}


@pytest.mark.parametrize(("src", "dst"), list(product(STAGES, STAGES)), ids=lambda s: s)
def test_stage_machine_table(src: str, dst: str) -> None:
    assert (dst in TRANSITIONS[src]) == ((src, dst) in _ALLOWED)
    if (src, dst) in _ALLOWED:
        check_transition(src, dst)
    else:
        with pytest.raises(RegistryError):
            check_transition(src, dst)


def test_unknown_stage_is_refused() -> None:
    with pytest.raises(RegistryError, match="unknown stage"):
        check_transition("candidate", "shipped")


def test_set_stage_walks_the_machine_and_records_history(reg: Registry, models: list[Path]) -> None:
    reg.register(models[0], now_s=10.0)
    with pytest.raises(RegistryError):
        reg.set_stage(1, "released", "skip the gate")
    with pytest.raises(RegistryError, match="reason"):
        reg.set_stage(1, "validated", "  ")
    reg.set_stage(1, "validated", "eval gate: 0 collisions", now_s=11.0)
    reg.set_stage(1, "released", "release 1 signed", now_s=12.0)
    reg.set_stage(1, "revoked", "field regressions", now_s=13.0)
    with pytest.raises(RegistryError):
        reg.set_stage(1, "released", "again")
    history = reg.history(1)
    assert [(e.from_stage, e.to_stage, e.at_s) for e in history] == [
        (None, "candidate", 10.0), ("candidate", "validated", 11.0), ("validated", "released", 12.0),
        ("released", "revoked", 13.0),
    ]
    assert reg.get(1).stage == "revoked"
    with pytest.raises(RegistryError):
        reg.set_stage(2, "validated", "no such version")


# -- lineage ----------------------------------------------------------------------------------------------


def test_lineage_follows_parents(reg: Registry, models: list[Path]) -> None:
    reg.register(models[0])
    reg.register(models[1], parent_version=1, lineage={"fl_rounds": 3, "strategy": "fedavg"})
    reg.register(models[2])  # an unrelated root
    reg.register(models[2], parent_version=2)
    assert [m.version for m in reg.lineage(4)] == [4, 2, 1]
    assert [m.version for m in reg.lineage(3)] == [3]
    assert reg.lineage(4)[1].lineage == {"fl_rounds": 3, "strategy": "fedavg"}
    with pytest.raises(RegistryError):
        reg.lineage(9)


# -- integrity and crash safety -----------------------------------------------------------------------------


def test_verify_catches_tampering_and_missing_blob(reg: Registry, models: list[Path]) -> None:
    m = reg.register(models[0])
    assert reg.verify(1) == m.sha256
    blob = reg.get(1).onnx_path
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        reg.verify(1)
    blob.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        reg.verify(1)


def test_damaged_blob_is_replaced_on_reregister(reg: Registry, models: list[Path]) -> None:
    reg.register(models[0])
    blob = reg.get(1).onnx_path
    blob.write_bytes(b"damaged")
    reg.register(models[0])
    assert reg.verify(1) and reg.verify(2)


def test_stale_manifest_file_is_repaired_from_the_index(reg: Registry, models: list[Path]) -> None:
    m = reg.register(models[0])
    reg.manifest_path(1).write_text("{}")
    assert reg.get(1).manifest == m and read_manifest(reg.manifest_path(1)) == m


def test_crash_between_blob_and_index_leaves_no_version(tmp_path: Path, models: list[Path]) -> None:
    """A process killed (os._exit, no cleanup) after the blob and manifest file but before the index row."""
    root = tmp_path / "r"
    script = textwrap.dedent(f"""
        import os
        from driveloop.cloud.registry import Registry
        def die(self, *args, **kwargs):
            os._exit(17)
        Registry._insert = die
        Registry({str(root)!r}).register({str(models[0])!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 17, proc.stderr
    assert (root / "blobs" / f"{sha256_file(models[0])}.onnx").is_file()  # the crash came after the blob
    with Registry(root) as r:
        assert r.list() == []
        with pytest.raises(RegistryError):
            r.get("latest")
        m = r.register(models[1])  # the orphaned v1 manifest file is overwritten by the real v1
        assert m.version == 1 and r.get(1).manifest == m
        assert read_manifest(r.manifest_path(1)).sha256 == sha256_file(models[1])
    assert not list((root / "blobs").glob("*.tmp")) and not list((root / "manifests").glob("*.tmp"))


def test_failure_inside_the_transaction_rolls_back(reg: Registry, models: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    reg.register(models[0])
    original = Registry._insert

    def half_insert(self: Registry, s, manifest: ModelManifest, at_s: float) -> None:
        original(self, s, manifest, at_s)  # the row and its stage event are flushed…
        raise OSError("disk full")  # …but the commit never happens

    monkeypatch.setattr(Registry, "_insert", half_insert)
    with pytest.raises(OSError):
        reg.register(models[1])
    monkeypatch.undo()
    assert [m.version for m, _ in reg.list()] == [1]
    assert len(reg.history(1)) == 1
    assert reg.register(models[1]).version == 2


# -- CLI: driveloop models ... ----------------------------------------------------------------------------


@pytest.fixture()
def home(tmp_path: Path, models: list[Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "home"))
    with Registry(tmp_path / "home" / "registry") as r:
        r.register(models[0], dataset_version="ds-0", metrics={"collisions": 0})
        r.register(models[1], parent_version=1, lineage={"fl_rounds": 2})
        r.set_stage(1, "validated", "eval gate ok")
    return tmp_path / "home"


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from driveloop.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_models_list_show_lineage_verify(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(["models", "list", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)["models"]
    assert [(r["version"], r["stage"], r["parent_version"]) for r in rows] == [(1, "validated", None), (2, "candidate", 1)]
    code, out, _ = _cli(["models", "show", "validated", "--json"], capsys)
    shown = json.loads(out)
    assert code == 0 and shown["manifest"]["version"] == 1 and shown["manifest"]["metrics"] == {"collisions": 0}
    assert [h["to"] for h in shown["history"]] == ["candidate", "validated"] and Path(shown["onnx_path"]).is_file()
    code, out, _ = _cli(["models", "lineage", "2", "--json"], capsys)
    assert code == 0 and [r["version"] for r in json.loads(out)["lineage"]] == [2, 1]
    assert json.loads(out)["lineage"][0]["lineage"] == {"fl_rounds": 2}
    code, out, _ = _cli(["models", "verify", "v2", "--json"], capsys)
    assert code == 0 and json.loads(out)["ok"] is True
    for human in (["models", "list"], ["models", "show", "2"], ["models", "lineage", "latest"]):
        code, out, _ = _cli(human, capsys)
        assert code == 0 and "2" in out


def test_cli_models_errors_are_one_line(home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    code, _, err = _cli(["models", "show", "9"], capsys)
    assert code == RegistryError.exit_code and err.count("\n") == 1 and "not in the registry" in err
    with Registry(home / "registry") as r:
        blob = r.get(2).onnx_path
    blob.write_bytes(blob.read_bytes()[:-1])
    code, _, err = _cli(["models", "verify", "2"], capsys)
    assert code == IntegrityError.exit_code and "sha256" in err and "Traceback" not in err
    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path / "nowhere"))
    code, _, err = _cli(["models", "list"], capsys)
    assert code == RegistryError.exit_code and "no model registry" in err
    assert not (tmp_path / "nowhere").exists()  # a read command never creates a registry


def test_concurrent_registrations_get_distinct_consecutive_versions(reg: Registry, models: list[Path]) -> None:
    """Three processes register at once: no lost or duplicate version, every manifest file matches its row."""
    script = textwrap.dedent("""
        import sys
        from driveloop.cloud.registry import Registry
        with Registry(sys.argv[1], db_url=sys.argv[2]) as r:
            for _ in range(10):
                r.register(sys.argv[3], training_run={"writer": sys.argv[3]})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(reg.root), reg.db_url, str(m)],
                              stderr=subprocess.PIPE, text=True) for m in models]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    listed = reg.list()
    assert [m.version for m, _ in listed] == list(range(1, 31))
    by_writer = {str(m): sha256_file(m) for m in models}
    for manifest, _ in listed:
        assert manifest.sha256 == by_writer[manifest.training_run["writer"]]
        assert read_manifest(reg.manifest_path(manifest.version)) == manifest  # no repair needed
