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

``scripts/test.sh`` runs the suite on every core with pytest-xdist, ``--dist loadscope``: a test
module runs on one worker, so its module fixtures are made once. The modules of parity_tests/
all go to one worker (``pytest_xdist_make_scheduler``): they compile the same reference steps
through ``parity_tests.harness``, and spread over two workers both compiled them (2 workers:
179-189 s instead of 209 s; one process: 242-246 s).
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


#: Seconds each long scope took (first test's start to last test's end on one pytest-xdist worker,
#: default suite, ``-n 2``, this 2-core machine). Only the order in which xdist hands out scopes uses
#: them: longest first, so that the last scope a worker starts is a short one and the workers finish
#: together (in xdist's order, most tests first, the 12 s kill-and-resume module came last and the
#: other worker waited ~10 s). A stale or missing entry makes a run slower, never different.
_SCOPE_SECONDS = {
    "parity_tests/": 136.0,
    "tests/test_train.py": 33.0,
    "tests/test_penalty_options.py": 18.0,
    "tests/test_attacks.py": 17.5,
    "tests/test_kill_resume.py": 12.0,
    "tests/test_nnx.py": 10.0,
    "tests/test_onednn_conv.py": 9.0,
    "tests/test_penalty_properties.py": 9.0,
    "tests/test_reliability_round2.py": 8.5,
    "tests/test_train_torch.py": 8.5,
    "tests/test_layers.py": 7.5,
    "tests/test_model.py": 6.5,
    "tests/test_run_folder.py": 6.0,
    "tests/test_sweep.py": 5.5,
    "tests/test_cpu_devices.py": 5.0,
    "tests/test_bad_input.py": 5.0,
    "tests/test_reliability.py": 5.0,
    "tests/test_xla_options.py": 4.0,
    "tests/test_data.py": 2.5,
}
#: A scope not in the table (those under ~3 s, new ones): this many seconds per test.
_SECONDS_PER_UNLISTED_TEST = 0.1


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent without the plugin
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under ``--dist loadscope``: parity_tests/ is one scope (module docstring), handed out longest first.

    Overrides two methods of xdist's scheduler, ``_split_scope`` (the one its own ``--dist
    loadgroup`` overrides) and ``_assign_work_unit`` (its ``workqueue`` is the queue of scopes). They
    are xdist's, not a public hook: if a release renames them, parity_tests/ is split per module or
    the scopes go in xdist's order (most tests first) again: slower, not wrong. Other modes as they are.
    """
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LongestScopesFirst(LoadScopeScheduling):
        _ordered = False

        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith("parity_tests/"):
                return "parity_tests/"
            return super()._split_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self._ordered:  # the queue is complete before the first scope is handed out
                for scope in sorted(self.workqueue, key=lambda scope: -self._seconds(scope)):
                    self.workqueue.move_to_end(scope)
                self._ordered = True
            super()._assign_work_unit(node)

        def _seconds(self, scope: str) -> float:
            return _SCOPE_SECONDS.get(scope, _SECONDS_PER_UNLISTED_TEST * len(self.workqueue[scope]))

    return LongestScopesFirst(config, log)


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_CREATED, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
