"""Session-wide settings of the whole test suite (tests/ and parity_tests/).

Many tests start ``python -m jax_impl.train`` as a real process, and each such process compiles
the same train and eval steps again. A persistent XLA compilation cache, fresh for each pytest
session and removed at its end, lets those processes (and pytest-xdist workers) reuse each
other's compilations: it changes which process compiles, never what is computed. A cache folder
the user already set (``JAX_COMPILATION_CACHE_DIR``) is used as it is and kept.

JAX writes a cache entry in place; with a size limit set it takes a file lock around every read
and write, so a process never reads an entry another one is still writing (the limit, 4 GiB, is
never reached by the suite).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CREATED = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    # Environment variables, so that child processes inherit them; set before JAX is imported
    # by any test module, which reads them at import.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        path = tempfile.mkdtemp(prefix="agp-test-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path
        config.stash[_CREATED] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_CREATED, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
