#!/usr/bin/env bash
# One-shot GPU check (about 8-11 minutes on an H100/H200 host): versions; float32 precision per
# framework setting against float64 (parity_tests.gpu_precision); the step-time benchmark on the GPU
# with PyTorch eager and its whole step replayed from a CUDA graph; the JAX training CLI against its
# bare step with 1, 4, 8 and 16 steps per dispatch; the JAX training CLI end to end on digits; the
# parity report with JAX on the GPU; torch.compile of the penalised step. Everything it writes goes
# to $OUT (at most a few files, so that a remote runner can bring them all back).
#
#     OUT=/tmp/gpu_out bash benchmarks/gpu_run.sh
#
# Each stage has its own timeout so that a slow stage does not lose the others' results; the
# stages run most important first. PYTHON picks the interpreter (default python3). STAGES picks the
# stages (default all: precision step cli digits parity compile); a machine lent for at most 10
# minutes per command takes two calls, each writing its own log:
#
#     OUT=/tmp/gpu_out STAGES="precision step cli" bash benchmarks/gpu_run.sh     # ~9 min
#     OUT=/tmp/gpu_out STAGES="digits parity compile" bash benchmarks/gpu_run.sh  # ~7 min
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STAGES="${STAGES:-precision step cli digits parity compile}"
LOG="$OUT/gpu_run_${STAGES// /_}.log"
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
run() { "$@" 2>&1 | grep -v "^USDT" | tee -a "$LOG"; }
stage() { [[ " $STAGES " == *" $1 "* ]]; }

log "versions"
run nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
run "$PY" -c "import sys; print(sys.version)"
"$PY" -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda\S*|flax|optax|orbax\S*|torch|numpy|nvidia-cudnn\S*|triton) " \
    | tee -a "$LOG"
run "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.backends.cudnn.version())"
run "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"

if stage precision; then
log "float32 precision settings on the GPU (parity_tests.gpu_precision)"
run timeout 120 "$PY" -m parity_tests.gpu_precision --batch 32
fi

if stage step; then
log "GPU step time: JAX default and jit_options(), PyTorch eager and CUDA graph"
run timeout 170 "$PY" -m benchmarks.step_time --batch-sizes 1 32 128 512 --repeats 10 --min-block-ms 20 \
    --torch-variants eager cuda-graph --out "$OUT/gpu_step_time.json"
fi

if stage cli; then
log "JAX training CLI against its bare step, --steps-per-dispatch auto (8) / 1 / 4 / 16"
run timeout 240 "$PY" -m benchmarks.step_time --cli --frameworks jax --batch-sizes 32 128 --cli-steps 208 \
    --cli-warmup 48 --cli-jax-flags="--steps-per-dispatch 1" --cli-jax-flags="--steps-per-dispatch 4" \
    --cli-jax-flags="--steps-per-dispatch 16" --out "$OUT/gpu_cli.json"
fi

if stage digits; then
log "JAX training CLI on digits, end to end (the README's main job)"
run timeout 150 "$PY" -m jax_impl.train --workdir /tmp/gpu_run_digits
cp /tmp/gpu_run_digits/metrics.jsonl "$OUT/gpu_train_digits_metrics.jsonl" 2>/dev/null
fi

if stage parity; then
log "parity report, JAX on the GPU in full float32 (harness.full_float32), PyTorch on CPU"
run timeout 150 "$PY" -m parity_tests.report
fi

if stage compile; then
log "torch.compile of the penalised step (batch 32)"
run timeout 100 "$PY" -m benchmarks.step_time --batch-sizes 32 --repeats 5 --min-block-ms 20 \
    --frameworks torch --torch-variants eager compile --out "$OUT/gpu_torch_compile.json"
fi
log done
