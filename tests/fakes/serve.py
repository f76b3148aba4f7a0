"""A driveloop server as a child process on a loopback port, for tests that exercise `... serve` itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from driveloop.cloud.broker import free_port


def driveloop_command() -> list[str]:
    """The installed `driveloop` script, or the CLI through this interpreter when it is not on PATH."""
    exe = shutil.which("driveloop")
    return [exe] if exe else [sys.executable, "-c", "from driveloop.cli import main; main()"]


@contextmanager
def ota_serve(home: Path, ready: Callable[[str], bool], env: Mapping[str, str] | None = None) -> Iterator[str]:
    """`driveloop ota serve` with DRIVELOOP_HOME ``home`` (plus ``env``) on a free port; yields its URL once
    ``ready(url)`` holds (up to 300 polls; a child that died fails with its stderr); terminated and reaped
    on exit — only this process, by its own handle."""
    port = free_port()
    proc = subprocess.Popen([*driveloop_command(), "ota", "serve", "--port", str(port)],
                            env=os.environ | {"DRIVELOOP_HOME": str(home), **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if ready(url):
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait()
