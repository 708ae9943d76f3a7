"""Fixtures shared by the modules of tests/ (pytest finds them here: a module only names them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> tuple[Path, Path]:
    """(data file, workdir of a finished 2-step JAX run on it, checkpoints at steps 1 and 2).

    Shared by every test: use it read-only, and ``existing_run`` for a workdir to change.
    """
    from tests.npz_runs import make_template  # JAX is imported only by the tests that use it

    return make_template(tmp_path_factory.mktemp("template"))


@pytest.fixture
def existing_run(template, tmp_path) -> Path:
    """A fresh copy of the template's workdir, for a test that resumes, damages or checks it."""
    _, run = template
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.fixture(params=["jax", "torch"])
def cli(request) -> str:
    """Each test that takes ``cli`` runs with the JAX and with the PyTorch training CLI: the keys of
    ``tests.cli_runs.MAINS`` (``run_main(cli, argv, capsys)`` runs it in the test process)."""
    return request.param


@pytest.fixture(scope="module")
def one_torch_thread():
    """PyTorch's CPU kernels on one thread for the module (parity_tests.harness.single_threaded_torch).

    For the modules that train PyTorch in the test process (``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``): on batches of 8 small images, in a process where
    XLA keeps its own thread pool, PyTorch's OpenMP workers spin against it, and a run of 60 such
    steps took 17 s with 2 threads and 3 s with 1 on a loaded 2-core machine. Every test compares
    runs made under the same setting, or within tolerances that either setting meets.
    """
    from parity_tests.harness import single_threaded_torch  # imported here: it loads JAX and PyTorch

    with single_threaded_torch():
        yield


@pytest.fixture
def compile_counter():
    """A ``tests.compile_counter.CompileCounter`` active for the test: ``compile_counter.compilations(
    "train_step")`` is how many times the train step was compiled since the test started."""
    from tests.compile_counter import CompileCounter  # imports JAX: only for the tests that use it

    with CompileCounter() as counter:
        yield counter
