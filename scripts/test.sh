#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (as root) and runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0
if command -v apt-get >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq prometheus chromium postgresql >/dev/null
fi
python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e ".[test]"
# The layer rules of docs/ARCHITECTURE.md (pyproject [tool.importlinter]): a wrong-way import fails CI.
lint-imports --no-cache
python3 -m pytest -q -p no:cacheprovider "$@"
