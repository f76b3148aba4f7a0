#!/usr/bin/env python3
"""Regenerate the documentation's dashboard picture (docs/dashboard.png).

Starts the fleet server the browser test renders (``tests/ota/test_dashboard_browser.py``
``mid_rollout_server``: a rollout held in its 50 % stage after healthy shadow and canary stages, all
state in a temporary folder), takes a headless-Chromium screenshot of its dashboard and writes it to
``--out``. Tests never write into the repository; this script is the one thing that does, when run.

    python3 scripts/dashboard_screenshot.py [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 10_000  # a blank or failed render is far smaller


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png", help="where the PNG goes")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # the test helpers live in the repository's tests package
    from tests.ota.test_dashboard_browser import CHROMIUM, chromium, mid_rollout_server

    if CHROMIUM is None:
        print("dashboard_screenshot: chromium is not installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dashboard-shot-") as tmp_dir:
        tmp = Path(tmp_dir)
        shot = tmp / "dashboard.png"
        with mid_rollout_server(tmp / "server") as (srv, _rid):
            res = chromium(tmp, f"--screenshot={shot}", f"{srv.url}/")
        data = shot.read_bytes() if shot.is_file() else b""
        if res.returncode != 0 or len(data) < MIN_PNG_BYTES or not data.startswith(PNG_MAGIC):
            print(f"dashboard_screenshot: chromium made no usable PNG (exit {res.returncode}): {res.stderr[-2000:]}",
                  file=sys.stderr)
            return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_bytes(data)
    tmp_out.replace(args.out)  # all or nothing: a failed run leaves the old picture in place
    print(f"wrote {args.out} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
