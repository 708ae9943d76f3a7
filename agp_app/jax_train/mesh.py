"""The JAX trainer's devices: a 1-D ``"data"`` mesh, its shardings, and batches put on it."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agp_app.batching import check_batch_fits
from agp_app.errors import UsageError

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices of all processes)."""
    return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Rows split evenly over the ``"data"`` axis (inputs, labels, mask)."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host batch -> global arrays sharded over ``mesh``; with several processes each sends its rows."""
    sharding = batch_sharded(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    rows = len(batch["mask"]) // jax.process_count()
    lo = jax.process_index() * rows
    return {k: jax.make_array_from_process_local_data(sharding, v[lo : lo + rows], v.shape)
            for k, v in batch.items()}


def check_batch_size(batch_size: int, mesh: Mesh, num_train: int) -> None:
    """``UsageError`` unless 1 <= B <= N and B divides evenly over the devices and processes."""
    check_batch_fits(batch_size, num_train)
    n = mesh.devices.size
    if batch_size % n or batch_size % jax.process_count():
        raise UsageError(f"--batch-size {batch_size} must be a multiple of the number of devices ({n}) "
                         f"so that every device gets the same number of examples")
