"""Session-wide settings of the whole test suite (tests/ and parity_tests/).

Many tests start ``python -m jax_impl.train`` as a real process, and each such process compiles
the same train and eval steps again. A persistent XLA compilation cache, fresh for each pytest
session and removed at its end, lets those processes reuse each other's compilations: it changes
which process compiles, never what is computed. A cache folder the user already set
(``JAX_COMPILATION_CACHE_DIR``) is used as it is and kept.

The test processes themselves (pytest, or its pytest-xdist workers) write to a session's cache only
the programs that took at least ``TEST_PROCESS_MIN_COMPILE_S`` to compile (the CLI's train and eval
steps, ``Net.init``: what child processes and the other worker compile again), and read it for
every program. Writing all of their ~1,100 programs cost more than the other worker saved by
reading them (default suite, 2 workers on 2 cores: 209 s instead of 222-233 s); writing none of
them made every CLI child process compile the steps the test process had compiled already.

JAX writes a cache entry in place; with a size limit set it takes a file lock around every read
and write, so a process never reads an entry another one is still writing (the limit, 4 GiB, is
never reached by the suite).

``scripts/test.sh`` runs the suite on every core with pytest-xdist, ``--dist loadfile``: a test
module runs on one worker, so its module fixtures are made once; xdist hands out the modules with
the most tests first. Nothing here changes how xdist schedules. (The modules of parity_tests/
compile some reference steps in common, which one worker for all of them would compile once; xdist's
grouping for that, ``--dist loadgroup``, groups nothing with pytest 9.2: pytest-xdist issue 1386.)
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CREATED = pytest.StashKey[str]()
_CACHE_PREFIX = "agp-test-xla-cache-"
#: Seconds of compilation from which a test process writes the program to the session's cache.
TEST_PROCESS_MIN_COMPILE_S = 1.0


def pytest_configure(config: pytest.Config) -> None:
    # Environment variables, so that child processes (and xdist workers, started after this hook in
    # the controller) inherit them; set before JAX is imported by any test module, which reads them
    # at import.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        path = tempfile.mkdtemp(prefix=_CACHE_PREFIX)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path
        config.stash[_CREATED] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))


def pytest_sessionstart(session: pytest.Session) -> None:
    """This process writes only its slow compilations to a session's cache (module docstring).

    Set before collection, and JAX imported for it, because a test module may compile at import;
    except in pytest-xdist's controller ("dsession"), which runs no test and should start its
    workers without the ~1 s import. Child processes keep the environment's setting: everything.
    """
    session_cache = os.path.basename(os.environ["JAX_COMPILATION_CACHE_DIR"]).startswith(_CACHE_PREFIX)
    if session_cache and not session.config.pluginmanager.has_plugin("dsession"):
        import jax

        jax.config.update("jax_persistent_cache_min_compile_time_secs", TEST_PROCESS_MIN_COMPILE_S)


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_CREATED, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
