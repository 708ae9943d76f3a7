"""jit_options: the per-jit XLA options of the project's compiled steps exist in this jaxlib and only
change rounding."""

import warnings

import jax
import numpy as np
import pytest

from jax_impl import Net, jit_options, penalized_loss
from jax_impl.conv_impl import ConvImpl
from jax_impl.xla_options import CPU_COMPILER_OPTIONS
from parity_tests.harness import fast_jit
from tests._model_fixtures import params_like


def test_cpu_gets_the_eigen_convolution_options_and_other_backends_none():
    eigen = {"compiler_options": CPU_COMPILER_OPTIONS}
    assert jit_options("cpu", conv_impl="canonical") == eigen  # accepted by this jaxlib
    assert jit_options("gpu") == {} and jit_options("tpu") == {}
    jit_options("cpu", conv_impl="canonical")["compiler_options"]["extra"] = 1  # a fresh dict to extend
    assert "extra" not in CPU_COMPILER_OPTIONS
    for impl in ("xla", "im2col", ConvImpl.CANONICAL):
        assert jit_options("cpu", conv_impl=impl) == eigen


def test_a_onednn_model_gets_no_options_where_onednn_runs():
    from jax_impl import onednn_conv

    expected = {} if onednn_conv.available() else {"compiler_options": CPU_COMPILER_OPTIONS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "onednn is unavailable" where it is
        assert jit_options("cpu", conv_impl="onednn") == expected
    assert jit_options("cpu") == expected  # "auto" is oneDNN on CPU where it is built
    assert jit_options("cpu", conv_impl=Net().conv_impl) == expected
    assert jit_options("gpu", conv_impl="onednn") == {}


def penalty_terms_and_grads(params, x, y):
    """The seed's penalised step on ``Net`` with XLA's canonical convolutions (those the options reach):
    the penalty terms and the parameter gradient."""
    model = Net(conv_impl="canonical")
    (_, aux), grads = jax.value_and_grad(
        lambda p: penalized_loss(p, model, x, y, penalty_weight=10.0), has_aux=True)(params)
    return aux["penalty_terms"], grads


@pytest.fixture(scope="module")
def seed_step():
    """The seed's Net and batch shape (32x32x3, 4 images in [0, 1)), float32 parameters, and the step
    compiled with the options and, for reference, with JAX's defaults in float32 (gradients) and
    float64 (terms): each compiled once for both tests."""
    rng = np.random.default_rng(3)
    x64 = rng.random((4, 32, 32, 3))
    y = rng.integers(0, 10, 4).astype(np.int32)
    with jax.enable_x64(True):
        params64 = params_like(Net(), x64)
        # The float64 reference: how it is compiled changes only its float64 rounding (~1e-15).
        terms64 = fast_jit(lambda p, x: penalty_terms_and_grads(p, x, y)[0])(params64, x64)
    params32 = jax.tree.map(lambda a: np.asarray(a, np.float32), params64)
    x32 = x64.astype(np.float32)
    options = jit_options("cpu", conv_impl="canonical")
    with_options = jax.jit(penalty_terms_and_grads, **options)(params32, x32, y)
    default = jax.jit(penalty_terms_and_grads)(params32, x32, y)
    return with_options, default, terms64


def test_the_penalised_gradient_with_the_options_matches_the_default_up_to_float32_rounding(seed_step):
    (_, got), (_, want), _ = seed_step
    # Same products summed in another order by other kernels: float32 rounding (~1e-6 relative) only.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


def test_with_the_options_float32_penalty_terms_stay_within_1e_4_of_float64(seed_step):
    """The Eigen kernels' float32 rounding, bounded against the float64 value of the same function.

    Measured 8.6e-6 (relu1) and 2e-8 (relu2) relative error with the options, 8e-8 with JAX's
    default kernels (7 images): 1e-4 leaves ~10x headroom and still catches a wrong kernel
    (errors of O(1)).
    """
    (got, _), _, want = seed_step
    for name in ("relu1", "relu2"):
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-4)
