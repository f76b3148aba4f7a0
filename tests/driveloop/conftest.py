"""Fixtures of the top-level command tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture()
def home(random_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the random-model home (tests that tamper must not touch the shared one), with no cloud
    or broker URL from the environment: a command uses its embedded local cloud."""
    dst = tmp_path / "home"
    shutil.copytree(random_home, dst)
    monkeypatch.setenv("DRIVELOOP_HOME", str(dst))
    for name in ("DRIVELOOP_CLOUD_URL", "DRIVELOOP_NATS_URL"):
        monkeypatch.delenv(name, raising=False)
    return dst
