#!/usr/bin/env bash
# Create .venv (if missing), install the project with its test extras, and build the
# native oneDNN convolutions (what conv_impl="auto" runs on CPU).
# On machines without an NVIDIA GPU, PyTorch's CPU build is installed first,
# so that the "torch" requirement does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
    # TORCH_INDEX_URL may point pip at PyTorch's CPU wheel index on other machines.
    python -m pip install -q "torch==${TORCH_CPU_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
python -m pip install -q -e ".[${EXTRAS:-dev}]"
# The explicit build step (~10 s; a no-op when a verified current build exists). Without g++ or
# oneDNN (not Linux x86-64) it prints one line and setup goes on: the models then use XLA's
# convolutions ("canonical").
python -m jax_impl.onednn_conv build --timeout "${ONEDNN_BUILD_TIMEOUT:-300}" || true
