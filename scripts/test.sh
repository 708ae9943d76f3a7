#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, and run the default (fast) test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m pytest -m "not slow" "$@"
