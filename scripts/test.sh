#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, and run the default (fast) test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow`, or `-n 0` to run in one process.
# The tests run in parallel, one pytest-xdist worker per core, at most 4 (each imports JAX and
# PyTorch: ~1.7 GB); loadfile keeps a module on one worker, so its module fixtures are made once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
# PYTHONDONTWRITEBYTECODE emptied: every worker and child process may reuse the bytecode (and pytest
# its assertion-rewritten modules) that the first one compiled, where the environment turns caching off.
PYTHONDONTWRITEBYTECODE= python -m pytest -m "not slow" -n auto --maxprocesses=4 --dist loadfile "$@"
