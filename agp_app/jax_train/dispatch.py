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

``auto`` (``resolve_steps_per_dispatch``):

* CPU: 1. A step is compute-bound there: the dispatch and the host's work are ~1% of a step at
  batch 32-128 on a 2-core CPU (measured), and a second program (the scan) would cost seconds of
  compilation.
* GPU/TPU: ``ACCELERATOR_STEPS_PER_DISPATCH`` (8). On an H100 the penalised step of the CNN at
  batch 32 is 0.8 ms while the CLI's median ``step_time_s`` was 2.3 ms (docs/performance.md,
  benchmarks/results/h100_gpu_run.log): the launches and the host bound it. 8 steps per call
  divide that fixed cost by 8, at the price of one more compilation and of signals and metrics
  seen up to 8 steps later. Not measured on a GPU yet: the choice of 8 (against 4, 16, 32) is
  still to be measured there.

With ``feeding.HostFeeder`` (``--augment``, several processes, data too large for the devices)
the run falls back to one step per call: its batches are prepared on the host step by step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

#: ``--steps-per-dispatch auto`` on a GPU or TPU (module docstring; still to be measured there).
ACCELERATOR_STEPS_PER_DISPATCH = 8


def resolve_steps_per_dispatch(value: int | str, platform: str, feed_mode: str) -> int:
    """Steps per compiled call for ``--steps-per-dispatch value`` on ``platform`` (``"cpu"``, ``"gpu"``,
    ``"tpu"``) with the feeder ``feed_mode`` (``"device"``, ``"host"``): ``auto`` is 1 on CPU and
    ``ACCELERATOR_STEPS_PER_DISPATCH`` elsewhere; a host feeder always gets 1."""
    if feed_mode != "device":
        return 1
    if value == "auto":
        return 1 if platform == "cpu" else ACCELERATOR_STEPS_PER_DISPATCH
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
