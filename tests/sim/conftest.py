"""Fixtures shared by the edge tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(params=["compiled", "numpy"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test on each sensor geometry backend (the compiled one needs numba: skipped without it)."""
    from driveloop.sim import _sensor_geometry as geometry

    if request.param == "compiled":
        pytest.importorskip("numba")
    before = geometry.backend()
    geometry.set_backend(request.param)
    try:
        yield request.param
    finally:
        geometry.set_backend(before)
