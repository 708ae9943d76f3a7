"""``keep_host_memory()``: glibc's malloc keeps large freed blocks for reuse instead of unmapping them.

Why. XLA's CPU runtime allocates a compiled program's temporary buffers at each call and frees them
at its end. glibc serves a block above its mmap threshold (at most 32 MiB when it adapts it itself)
with a fresh ``mmap`` and returns it with ``munmap``, so each call faults every page of its buffers in
again (and the kernel zeroes them). The penalised step of the seed CNN at batch 256 has ~62 MiB of
temporaries: ~15,000 page faults per call and 140 ms per step on a 2-core AMD EPYC (AVX2), against
2 faults and 131 ms with the settings below (``getrusage``'s minor faults over 30 steps, the
user-level step ``jax.jit(value_and_grad(penalized_loss))`` + SGD). At batch 128 (31 MiB, under the
adaptive threshold) glibc reuses the block by itself; larger models cross 32 MiB at smaller batches.

What (``mallopt``, process-wide, from the next allocation on):

* ``M_MMAP_THRESHOLD`` = ``MMAP_THRESHOLD`` (1 GiB): blocks up to that size come from malloc's heaps;
* ``M_TRIM_THRESHOLD`` = the largest int: freed memory is not returned to the system;
* ``M_TOP_PAD`` = ``TOP_PAD`` (1 GiB): a heap grows by that much more than asked (address space; a
  page costs memory only once touched), so the temporaries of the next call fit where the last
  ones were instead of in a new heap that is unmapped again when it empties.

The cost: the process keeps its peak heap (what a training run needs again at its next step
anyway), as PyTorch's CUDA caching allocator does on a GPU. The numbers computed do not change.
Nothing happens where the C library is not glibc (``mallopt`` missing: macOS, musl) or where the
user set glibc's own variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_TOP_PAD_``, ``GLIBC_TUNABLES``): their choice stands.

The training CLIs and the benchmarks call it at start; a program of one's own calls it once,
first thing::

    from jax_impl import keep_host_memory
    keep_host_memory()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

#: Blocks up to this size are served from malloc's heaps (module docstring).
MMAP_THRESHOLD = 1 << 30
#: Extra bytes a heap grows by (module docstring).
TOP_PAD = 1 << 30
#: ``mallopt``'s parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
#: The user's own malloc settings, which ``keep_host_memory`` leaves alone.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


@functools.cache
def keep_host_memory() -> bool:
    """Set glibc's malloc to keep large freed blocks (module docstring); True if it was set.

    False where there is no ``mallopt`` or one of ``USER_SETTINGS`` is in the environment. Once
    per process: later calls return the first call's answer.
    """
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library (Windows: no name), or one without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, TOP_PAD))
    return all([mallopt(param, value) == 1 for param, value in settings])  # a list: each one is tried
