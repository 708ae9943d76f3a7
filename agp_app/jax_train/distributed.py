"""Multi-host JAX: ``jax.distributed.initialize`` when the environment asks for several processes."""

from __future__ import annotations

import os

import jax


def distributed_launch() -> bool:
    """Whether the environment asks for a multi-process launch (see ``maybe_initialize_distributed``)."""
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or os.environ.get("AGP_DISTRIBUTED") == "1"


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize`` when a multi-process launch is configured; True if it did.

    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) plus ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; or ``AGP_DISTRIBUTED=1`` to let JAX detect SLURM, Open MPI or Cloud TPU.
    """
    if not distributed_launch():
        return False
    env, kwargs = os.environ, {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)  # without an address: JAX detects SLURM, Open MPI or Cloud TPU
    return True
