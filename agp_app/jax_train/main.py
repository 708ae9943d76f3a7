"""``python -m jax_impl.train``: flags -> ``train_and_evaluate``, after the process's JAX set-up.

Multi-host: when ``JAX_COORDINATOR_ADDRESS`` is set (with ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``), or ``AGP_DISTRIBUTED=1`` on a cluster JAX detects (SLURM, Open MPI,
Cloud TPU), ``jax.distributed.initialize`` is called first; each process then feeds its slice
of every global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from agp_app.config import TrainConfig, validate_config
from agp_app.jax_train.checkpoints import FRAMEWORK
from agp_app.jax_train.cpu_devices import configure_cpu_devices
from agp_app.jax_train.distributed import distributed_launch, maybe_initialize_distributed
from agp_app.jax_train.trainer import train_and_evaluate
from agp_app.trainer import run_cli


def train_cli(config: TrainConfig) -> str | None:
    """Set up JAX's devices for ``config``, train, and return the summary line (process 0 only)."""
    validate_config(config)  # before --cpu-devices is applied
    cpu_devices = configure_cpu_devices(config, distributed=distributed_launch())
    maybe_initialize_distributed()
    if cpu_devices and config.cpu_devices is None and jax.default_backend() == "cpu":
        print(f"JAX on CPU: the batch of {config.batch_size} is split over {cpu_devices} devices, one "
              f"per core (--cpu-devices 1 turns this off)", flush=True)
    # One process: a signal stops it at a step boundary. Several: every process would have to
    # agree on the step, so a signal kills as usual and the run resumes from its last checkpoint.
    result = train_and_evaluate(config, handle_signals=jax.process_count() == 1)
    return result.summary if jax.process_index() == 0 else None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: flags -> ``train_and_evaluate``.

    Usage and input errors: one line, exit 2; NaN/Inf in training: one line, exit 1;
    SIGTERM/Ctrl-C: checkpoint saved, one line, exit 143/130. ``--debug`` adds the traceback.
    """
    return run_cli(argv, "python -m jax_impl.train", FRAMEWORK, train_cli)
