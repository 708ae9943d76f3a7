"""``--steps-per-dispatch N``: N consecutive train steps in one compiled call, every step still logged.

Each compiled call costs a fixed launch: Python's dispatch of the call, the host's work for the
step (its indices, its ``Hyperparams``) and, on a GPU, the kernel launches the device waits for
when the step itself is short. ``steps.train_chunk`` runs N steps as one ``jax.lax.scan`` over the
steps' inputs, carrying the ``TrainState``: per step the example indices and real-row flags (the
batch is gathered on the device from ``feeding.DeviceFeeder``'s copy of the data) and the
``Hyperparams`` (the scheduled learning rate; the lazy ``--penalty-every`` schedule follows from
the state's step counter, as in single steps). It returns the N steps' metrics stacked on a
leading axis; ``fetch_metrics`` splits them into one record per step when the loop fetches them,
so metrics.jsonl, progress, the NaN check and the summary see every step as before.

The numbers are those of N single steps: the scan's body is ``train_step`` on the batch
``feeding.gather_batch`` builds, the same operations in the same order (tests/
test_steps_per_dispatch.py compares them in float64).

``auto`` (``resolve_steps_per_dispatch``): ``AUTO_STEPS_PER_DISPATCH`` (8) on every backend.

* CPU: a step called alone pays, besides Python's dispatch, for XLA's temporary buffers, allocated
  at each call (``agp_common.host_memory``: above 32 MiB, without ``keep_host_memory``, faulted in
  again at every call), and for the pool threads, asleep between calls. On a
  2-core AMD EPYC (AVX2), the CLI's train step in one process, ms per step, one asynchronous call
  per step against chunks of 8 (malloc's defaults): 1.52 / 1.22 at batch 1, 18.4 / 17.9 at 32,
  78.6 / 66.3 at 128 (N = 4 and 16 timed like 8). The CLIs' median ``step_time_s`` with
  ``keep_host_memory``, N = 1 against 8: 1.64 / 1.48, 18.6 / 16.1 and 69.8 / 64.1 ms
  (``python -m benchmarks.step_time --cli --frameworks jax --batch-sizes 1 32 128
  --cli-jax-flags="--steps-per-dispatch 1"``). The scan compiles in ~1.3 s for the CNN.
* GPU/TPU: on an H100 the penalised step of the CNN at batch 32 is 0.8 ms while the CLI's median
  ``step_time_s`` was 2.3 ms (docs/performance.md, benchmarks/results/h100_gpu_run.log): the
  launches and the host bound it; 8 steps per call divide that fixed cost by 8. Not measured on a
  GPU yet: the choice of 8 (against 4, 16, 32) is still to be measured there.

The price: one more compilation (the steps just before an evaluation, a checkpoint or the end run
singly, so the single step compiles too), and signals and metrics seen up to 8 steps later.

With ``feeding.HostFeeder`` (``--augment``, several processes, data too large for the devices)
the run falls back to one step per call: its batches are prepared on the host step by step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

#: ``--steps-per-dispatch auto`` (module docstring; measured on CPU, still to be measured on a GPU).
AUTO_STEPS_PER_DISPATCH = 8
#: The same number under its former name (``auto`` on a GPU or TPU; now on CPU too).
ACCELERATOR_STEPS_PER_DISPATCH = AUTO_STEPS_PER_DISPATCH


def resolve_steps_per_dispatch(value: int | str, platform: str, feed_mode: str) -> int:
    """Steps per compiled call for ``--steps-per-dispatch value`` on ``platform`` (``"cpu"``, ``"gpu"``,
    ``"tpu"``) with the feeder ``feed_mode`` (``"device"``, ``"host"``): ``auto`` is
    ``AUTO_STEPS_PER_DISPATCH`` on every platform; a host feeder always gets 1."""
    if feed_mode != "device":
        return 1
    if value == "auto":
        return AUTO_STEPS_PER_DISPATCH
    return int(value)


class ChunkStep(NamedTuple):
    """Step ``index`` of a compiled call's ``metrics`` (each of leading size n, on the device)."""

    metrics: dict[str, jax.Array]
    index: int


def fetch_metrics(items: list[Any]) -> list[dict[str, Any]]:
    """``jax.device_get`` of each step's metrics: a dict of arrays, or a ``ChunkStep`` whose stacked
    metrics are fetched once for all of its steps and then indexed on the host."""
    stacked = {id(item.metrics): item.metrics for item in items if isinstance(item, ChunkStep)}
    plain = [item for item in items if not isinstance(item, ChunkStep)]
    host_stacked, host_plain = jax.device_get((stacked, plain))
    plain_iter = iter(host_plain)
    return [{k: np.asarray(v)[item.index] for k, v in host_stacked[id(item.metrics)].items()}
            if isinstance(item, ChunkStep) else next(plain_iter) for item in items]
