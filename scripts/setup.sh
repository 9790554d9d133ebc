#!/usr/bin/env bash
# Create (or update) the project virtualenv in .venv with everything Wharf,
# its tests and its benchmarks need. Idempotent; safe to run on a fresh machine.
#   bash scripts/setup.sh            # then: .venv/bin/wharf demo / .venv/bin/python -m pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.wharf-setup-stamp
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import wharf.coordinator, torch, flwr" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch first (pinned: an unpinned torch pulls GBs of CUDA packages).
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
echo "$want" > "$stamp"
echo "setup: .venv ready ($(.venv/bin/python --version))"
