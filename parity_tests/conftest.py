"""Fixtures of the parity suite.

The helpers themselves (identical weights, NCHW <-> NHWC, float64 switch,
normwise comparison with explicit rtol/atol) live in ``parity_tests/harness.py``
so that ``python -m parity_tests.report`` uses the very same code; this file
only adapts them to pytest. It imports them inside the fixtures: this file is loaded when pytest
starts, also by pytest-xdist's controller, which runs no test and starts its workers only after
loading it (importing JAX and PyTorch here delayed every worker by ~3 s).
"""

from __future__ import annotations

import pytest

from parity_tests import DTYPES


@pytest.fixture(autouse=True, scope="session")
def _torch_on_one_thread():
    """See ``single_threaded_torch``: 15x faster reference steps on a shared 2-core machine."""
    from parity_tests.harness import single_threaded_torch

    with single_threaded_torch():
        yield


@pytest.fixture(autouse=True, scope="session")
def _jax_in_full_float32():
    """See ``full_float32``: no TF32 on GPUs."""
    from parity_tests.harness import full_float32

    with full_float32():
        yield


@pytest.fixture(params=DTYPES)
def dtype(request) -> str:
    """Each test that takes ``dtype`` runs in float64 and in float32."""
    return request.param


@pytest.fixture
def x64():
    """JAX in 64-bit mode for the duration of the test."""
    from parity_tests.harness import jax_dtype

    with jax_dtype("float64"):
        yield
