"""``--cpu-devices``: how many JAX devices the CPU is split into (data parallelism on one machine)."""

from __future__ import annotations

import os

import jax

from agp_app.config import TrainConfig
from agp_app.errors import UsageError
from jax_impl import onednn_conv

#: ``--cpu-devices auto`` gives each JAX CPU device at least this many examples of the batch: at
#: batch 128 two devices on two cores beat one (XLA's CPU convolutions use two cores poorly), at
#: batch 32 one device is faster (docs/performance.md).
EXAMPLES_PER_CPU_DEVICE = 64
#: The XLA flag that also sets the number of CPU devices; when the user set it, auto leaves it alone.
FORCE_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def choose_cpu_devices(batch_size: int, cores: int) -> int:
    """``--cpu-devices auto``: the most CPU devices with >= ``EXAMPLES_PER_CPU_DEVICE`` examples each,
    at most one per core, that divide ``batch_size`` evenly (1 for small batches)."""
    most = max(1, min(cores, batch_size // EXAMPLES_PER_CPU_DEVICE))
    return next(n for n in range(most, 0, -1) if batch_size % n == 0)


def auto_cpu_devices(config: TrainConfig, cores: int, xla_flags: str, distributed: bool) -> int:
    """``--cpu-devices auto``: ``choose_cpu_devices``, or 1 where splitting would not help or is not
    ours to do: several processes train together, the user's ``xla_flags`` set the device count, or
    the convolutions are oneDNN's, named or chosen by ``auto`` (its library is built: checked without
    starting JAX) - their custom calls have no sharding rule, so XLA would gather the whole batch on
    every device (1.7x slower at batch 128 on 2 cores); they thread over the batch themselves."""
    onednn = config.conv_impl == "onednn" or (config.conv_impl == "auto" and onednn_conv.library_built())
    if distributed or onednn or FORCE_DEVICE_COUNT_FLAG in xla_flags:
        return 1
    return choose_cpu_devices(config.batch_size, cores)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_cpu_devices(config: TrainConfig, distributed: bool) -> int | None:
    """Set JAX's number of CPU devices for this process from ``config.cpu_devices``; the number set.

    Takes effect only before JAX's backends start (the CLI calls it first). ``None`` (nothing set):
    auto chose one device (``auto_cpu_devices``), or JAX already runs in this process (an earlier
    ``main`` call) and auto keeps its devices. Only the CPU backend reads it: on a GPU or
    TPU machine JAX's devices, and the run, are unchanged. ``UsageError`` if an explicit count cannot
    be applied any more.
    """
    count = config.cpu_devices
    if count is None:
        count = auto_cpu_devices(config, usable_cores(), os.environ.get("XLA_FLAGS", ""), distributed)
        if count == 1:
            return None
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX's backends already started in this process: its devices are fixed
        have = len(jax.devices("cpu"))
        if config.cpu_devices is not None and have != count:
            raise UsageError(f"--cpu-devices {count}: JAX already runs with {have} CPU devices in this "
                             f"process; pass the flag to a fresh process") from None
        return None
    return count
