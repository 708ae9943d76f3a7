"""Session-wide settings of the whole test suite (tests/ and parity_tests/).

Many tests start ``python -m jax_impl.train`` as a real process, and each such process compiles
the same train and eval steps again. A persistent XLA compilation cache, fresh for each pytest
session and removed at its end, lets those processes reuse each other's compilations: it changes
which process compiles, never what is computed. A cache folder the user already set
(``JAX_COMPILATION_CACHE_DIR``) is used as it is and kept.

The test processes themselves (pytest, or its pytest-xdist workers) stay off a session's cache:
jit's in-memory cache already reuses their compilations, and writing their ~1,100 programs cost
more than one xdist worker saved by reading the other's (default suite, 2 workers on 2 cores:
209 s instead of 222-233 s).

JAX writes a cache entry in place; with a size limit set it takes a file lock around every read
and write, so a process never reads an entry another one is still writing (the limit, 4 GiB, is
never reached by the suite).

``scripts/test.sh`` runs the suite on every core with pytest-xdist, ``--dist loadscope``: a test
module runs on one worker, so its module fixtures are made once. The modules of parity_tests/
all go to one worker (``pytest_xdist_make_scheduler``): they compile the same reference steps
through ``parity_tests.harness``, and spread over two workers both compiled them (2 workers:
179-189 s instead of 209 s; one process: 242-246 s).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

_CREATED = pytest.StashKey[str]()
_CACHE_PREFIX = "agp-test-xla-cache-"


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
    _compile_without_the_session_cache()


def pytest_collection_finish(session: pytest.Session) -> None:
    _compile_without_the_session_cache()  # the test modules may have imported JAX only now


def _compile_without_the_session_cache() -> None:
    """Keep this process off a session's cache (module docstring); its child processes still use it.

    JAX decides at its first compilation: done before the first test, whichever imported JAX
    (parity_tests/conftest.py before ``pytest_configure``, or a test module at collection).
    """
    jax = sys.modules.get("jax")
    session_cache = os.path.basename(os.environ["JAX_COMPILATION_CACHE_DIR"]).startswith(_CACHE_PREFIX)
    if jax is not None and session_cache:
        jax.config.update("jax_enable_compilation_cache", False)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent without the plugin
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under ``--dist loadscope``, parity_tests/ is one scope (module docstring); other modes as they are.

    Overrides the one method that xdist's own ``--dist loadgroup`` scheduler overrides too (a
    method of xdist's, not a public hook: if a release renames it, parity_tests/ is split per
    module again, slower, not wrong).
    """
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ParitySuiteOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith("parity_tests/"):
                return "parity_tests/"
            return super()._split_scope(nodeid)

    return ParitySuiteOnOneWorker(config, log)


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_CREATED, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
