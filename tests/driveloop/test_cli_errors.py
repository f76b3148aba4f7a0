"""The CLI's promise: one line and an exit code, never a traceback — also for the errors that come from
the machine rather than from driveloop (a data directory that is a file or read-only, a number too large
for the database), mapped at the CLI boundary; ``--debug`` still shows the traceback."""

from __future__ import annotations

import errno
import os
import pathlib
from pathlib import Path

import pytest

from driveloop.cli import main

COMMANDS = [
    ["cloud", "vehicles", "list"],
    ["cloud", "vehicles", "add", "veh-1"],
    ["cloud", "segments", "list", "--json"],
    ["ota", "rollout", "status"],
    ["ota", "vehicles", "list"],
    ["ota", "vehicles", "disable", "veh-1"],
]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("driveloop: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_data_directory_that_is_a_file(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    home.write_text("not a directory\n")
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    monkeypatch.delenv("DRIVELOOP_OTA_URL", raising=False)
    assert main(args) == 5
    err = _one_line_error(capsys)
    assert str(home) in err and "Not a directory" in err


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_read_only_data_directory(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Root writes anywhere, so the read-only file system is simulated where every write starts: mkdir."""
    home = tmp_path / "home"
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    monkeypatch.delenv("DRIVELOOP_OTA_URL", raising=False)
    real_mkdir = pathlib.Path.mkdir

    def read_only(self: Path, *a: object, **kw: object) -> None:
        if str(self).startswith(str(home)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    assert main(args) == 5
    assert "Read-only file system" in _one_line_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_data_directory_for_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o555)
    monkeypatch.setenv("DRIVELOOP_HOME", str(home))
    try:
        assert main(["cloud", "vehicles", "list"]) == 5
        assert "Permission denied" in _one_line_error(capsys)
    finally:
        home.chmod(0o755)


def test_models_show_with_a_huge_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from driveloop.cloud.registry import Registry

    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path))
    with Registry(tmp_path / "registry"):
        pass
    assert main(["models", "show", "99999999999999999999999"]) == 2
    assert "too large" in _one_line_error(capsys)


def test_overflow_from_below_is_mapped_at_the_boundary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever layer lets an OverflowError through (SQLite's 'Python int too large to convert'), the
    CLI answers with one line and exit 2; ``--debug`` shows the traceback."""
    from driveloop.cloud.registry import Registry

    monkeypatch.setenv("DRIVELOOP_HOME", str(tmp_path))
    with Registry(tmp_path / "registry"):
        pass

    def overflow(*_: object, **__: object) -> None:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    monkeypatch.setattr(Registry, "list", overflow)
    assert main(["models", "list"]) == 2
    assert "number out of range" in _one_line_error(capsys)
    with pytest.raises(OverflowError):
        main(["--debug", "models", "list"])
