"""Fixtures shared by the test modules that run the training CLIs in the test process.

Use one with ``from tests._cli_fixtures import one_torch_thread  # noqa: F401`` and
``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """PyTorch's CPU kernels on one thread for the module (parity_tests.harness.single_threaded_torch).

    These modules train PyTorch on batches of 8 small images in a process where XLA keeps its own
    thread pool: PyTorch's OpenMP workers then spin against it, and a run of 60 such steps took 17 s
    with 2 threads and 3 s with 1 on a loaded 2-core machine. Every test compares runs made under the
    same setting, or within tolerances that either setting meets.
    """
    from parity_tests.harness import single_threaded_torch  # imported here: it loads JAX and PyTorch

    with single_threaded_torch():
        yield
