"""How each training batch reaches the JAX trainer's devices: gathered there, or prepared on the host.

``run_loop`` asks for a step on example indices (``agp_app.batching.BatchOrder``); a feeder turns them
into the step's global batch ``{x (B, H, W, C), y (B,), mask (B,)}`` on the ``"data"`` mesh, padded
and masked as ``agp_app.batching.padded_batch`` does (the last partial batch of an epoch: zero rows,
mask 0). Two ways, with the same numbers bit for bit:

* ``DeviceFeeder`` (the default when it applies, ``choose_feed``): the training split, converted
  once by ``take_batch`` (dtype, ``pixel_scale``), is kept on every device; a step sends only its
  (B,) int32 indices and (B,) bool "real row" flags, and a compiled gather (``gather_batch``:
  ``jnp.take``, rows copied unchanged) builds the batch there. No per-step NumPy gather, no image
  transfer: the host does nothing per step that the device waits for.
* ``HostFeeder``: ``padded_batch`` in NumPy, then the host-side transform (``--augment``, seeded
  by (seed, step): ``agp_app.augment``), then ``put_batch`` (each process its rows). Used with
  augmentation, with several processes, and when the data is too large to keep on the devices
  (``DEVICE_DATA_MAX_BYTES``). JAX dispatches asynchronously, so this work overlaps the previous
  step's compute; it costs about 1% of a step on a 2-core CPU at batch 32-128.

The ``mask`` has the trainer's dtype; ``padded_batch``'s zero padding and 0/1 mask are reproduced
exactly: a padded row gathers example 0 and is then zeroed (``jnp.where``, exact).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from agp_app.augment import augment_batch
from agp_app.batching import padded_batch, take_batch
from agp_app.data import Dataset
from agp_app.jax_train.mesh import batch_sharded, put_batch, replicated

#: Feeding modes (``JaxTrainer(feed=...)``): ``auto`` = ``choose_feed``.
FEEDS = ("auto", "device", "host")
#: Largest training split (converted to the trainer's dtype) kept on each device: CIFAR-10 in float32
#: (600 MiB) fits; larger data is fed from the host.
DEVICE_DATA_MAX_BYTES = 1 << 30

#: ``(batch, indices, step) -> batch``: a host-side change of the padded NumPy batch before it is put on
#: the devices (``augment_transform``); ``indices`` are the step's real examples (the first rows).
HostTransform = Callable[[dict[str, np.ndarray], np.ndarray, int], dict[str, np.ndarray]]


def augment_transform(ops: tuple[str, ...], seed: int) -> HostTransform:
    """``--augment ops``: the real rows of the batch augmented for 0-based update ``step`` (drawn from
    (seed, step), so a resumed run draws the same); the padding rows stay zero."""

    def transform(batch: dict[str, np.ndarray], indices: np.ndarray, step: int) -> dict[str, np.ndarray]:
        n = len(indices)
        batch["x"][:n] = augment_batch(batch["x"][:n], seed=seed, step=step, ops=ops)
        return batch

    return transform


def choose_feed(feed: str, ds: Dataset, dtype, mesh: Mesh, host_transform: HostTransform | None) -> str:
    """``"device"`` or ``"host"`` for ``feed`` (``FEEDS``).

    ``auto``: ``device`` when nothing is done to the batch on the host (``host_transform`` None), one
    process feeds all devices, and the converted training split fits ``DEVICE_DATA_MAX_BYTES``; else
    ``host``. ``ValueError`` for ``device`` where it cannot apply.
    """
    if feed not in FEEDS:
        raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
    if feed == "host":
        return feed
    nbytes = ds.x_train[:1].astype(dtype).nbytes * len(ds.x_train)
    problem = ("the batch is transformed on the host (--augment)" if host_transform is not None
               else "several processes feed the devices" if jax.process_count() > 1
               else f"the training split needs {nbytes / 2**20:.0f} MiB per device, more than "
                    f"{DEVICE_DATA_MAX_BYTES / 2**20:.0f} MiB" if nbytes > DEVICE_DATA_MAX_BYTES
               else None)
    if problem is None:
        return "device"
    if feed == "device":
        raise ValueError(f"feed='device' cannot apply: {problem}; use feed='auto' or 'host'")
    return "host"


def padded_indices(indices: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``indices`` (b,) -> (B,) int32 with 0 in the padding rows, and (B,) bool: True for the b real rows."""
    idx = np.zeros(batch_size, np.int32)
    idx[: len(indices)] = indices
    return idx, np.arange(batch_size) < len(indices)


def gather_batch(x: jax.Array, y: jax.Array, idx: jax.Array, real: jax.Array,
                 mask_dtype) -> dict[str, jax.Array]:
    """Rows ``idx`` (B,) of ``x`` (N, H, W, C) and ``y`` (N,), the rows where ``real`` (B,) is False zeroed:
    ``{x (B, H, W, C), y (B,) int32, mask (B,) 0/1 of mask_dtype}``, as ``padded_batch`` builds it."""
    xb = jnp.where(real[:, None, None, None], jnp.take(x, idx, axis=0), jnp.zeros((), x.dtype))
    yb = jnp.where(real, jnp.take(y, idx, axis=0), jnp.zeros((), y.dtype))
    return {"x": xb, "y": yb, "mask": real.astype(mask_dtype)}


class HostFeeder:
    """``padded_batch`` (NumPy), ``host_transform`` (the hook for host-side augmentation), ``put_batch``."""

    mode = "host"

    def __init__(self, ds: Dataset, batch_size: int, dtype, mesh: Mesh,
                 host_transform: HostTransform | None = None):
        self.ds, self.batch_size, self.dtype, self.mesh = ds, batch_size, np.dtype(dtype), mesh
        self.host_transform = host_transform

    def __call__(self, indices: np.ndarray, step: int) -> dict[str, jax.Array]:
        """The batch of ``indices`` (b <= B,) for 0-based update ``step``, on the mesh."""
        ds = self.ds
        batch = padded_batch(ds.x_train, ds.y_train, indices, self.batch_size, self.dtype, ds.pixel_scale)
        if self.host_transform is not None:
            batch = self.host_transform(batch, indices, step)
        return put_batch(batch, self.mesh)


class DeviceFeeder:
    """The converted training split on every device of ``mesh``; each step gathers its batch there."""

    mode = "device"

    def __init__(self, ds: Dataset, batch_size: int, dtype, mesh: Mesh):
        self.batch_size, self.dtype = batch_size, np.dtype(dtype)
        x, y = take_batch(ds.x_train, ds.y_train, np.arange(len(ds.y_train)), self.dtype, ds.pixel_scale)
        self.x, self.y = jax.device_put((x, y), replicated(mesh))  # (N, H, W, C), (N,) int32
        self._gather = jax.jit(gather_batch, static_argnums=4, out_shardings=batch_sharded(mesh))

    def __call__(self, indices: np.ndarray, step: int) -> dict[str, jax.Array]:
        """The batch of ``indices`` (b <= B,) on the mesh (``step`` unused: nothing is drawn per step)."""
        idx, real = padded_indices(indices, self.batch_size)
        return self._gather(self.x, self.y, idx, real, self.dtype)


def make_feeder(feed: str, ds: Dataset, batch_size: int, dtype, mesh: Mesh,
                host_transform: HostTransform | None = None) -> Any:
    """``DeviceFeeder`` or ``HostFeeder`` as ``choose_feed`` decides; called as ``feeder(indices, step)``."""
    if choose_feed(feed, ds, dtype, mesh, host_transform) == "device":
        return DeviceFeeder(ds, batch_size, dtype, mesh)
    return HostFeeder(ds, batch_size, dtype, mesh, host_transform)
