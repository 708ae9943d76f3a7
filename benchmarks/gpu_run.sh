#!/usr/bin/env bash
# One-shot device check (about 6 minutes): versions, the step-time benchmark on the GPU
# (JSON + sweep plot), the layer tests on the GPU, and CPU runs pinned to 2 cores as a quiet
# reference (default, and with XLA's YNNPACK convolutions switched off). Everything it writes goes to $OUT.
#
#     OUT=/tmp/gpu_out bash benchmarks/gpu_run.sh
#
# Each stage has its own timeout so that a slow stage does not lose the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
log() { echo "== $(date -u +%H:%M:%S) $*"; }

log versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
python -c "import sys; print(sys.version)"
pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|flax|optax|torch|numpy|nvidia-cudnn|matplotlib|pytest)" \
    | tee "$OUT/pip_list.txt"
python -c "import flax, optax" 2>/dev/null || {
    log "flax/optax missing: trying pip from local wheels only"
    timeout 90 pip install -q --no-index flax optax 2>&1 | tail -2
}
python -c "import jax_impl" 2>/dev/null || timeout 60 pip install -q -e . --no-deps 2>&1 | tail -2
if ! python -c "import torch" 2>/dev/null; then
    log "torch missing: trying pip from local wheels only"
    timeout 60 pip install -q --no-index torch 2>&1 | tail -2
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1
python -c "import jax; print('jax', jax.__version__, jax.devices())"

log "GPU benchmark (default Net() = auto, plus conv_impl=canonical)"
timeout 120 python -m benchmarks.step_time --batch-sizes 1 32 128 512 --repeats 10 \
    --jax-conv-impls canonical --out "$OUT/gpu_step_time.json" 2>&1 | grep -v "^USDT" \
    | tee "$OUT/gpu_step_time.txt" | tail -24

log "GPU sweep"
timeout 100 python -m benchmarks.step_time --sweep --repeats 3 --min-block-ms 20 \
    --out "$OUT/gpu_sweep.json" --plot "$OUT/gpu_sweep.png" 2>&1 | grep -v "^USDT" | tail -14

log "layer tests on GPU"
timeout 100 python -m pytest -q -x -p no:cacheprovider tests/test_layers.py 2>&1 | tail -3

log "CPU reference pinned to 2 cores (JAX_PLATFORMS=cpu, taskset -c 0,1)"
JAX_PLATFORMS=cpu timeout 100 taskset -c 0,1 python -m benchmarks.step_time --torch-device cpu \
    --repeats 7 --jax-conv-impls im2col --out "$OUT/cpu2_step_time.json" 2>&1 | grep -v "^USDT" \
    | tail -19 | tee "$OUT/cpu2_step_time.txt"

log "same, XLA's YNNPACK convolutions off (opt-in flag)"
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION JAX_PLATFORMS=cpu \
    timeout 80 taskset -c 0,1 python -m benchmarks.step_time --torch-device cpu --repeats 7 \
    --out "$OUT/cpu2_eigen_step_time.json" 2>&1 | grep -v "^USDT" | tail -13 | tee "$OUT/cpu2_eigen_step_time.txt"
log done
