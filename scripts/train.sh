#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: train on the built-in digits data.
# Extra arguments go to `python -m jax_impl.train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m jax_impl.train "$@"
