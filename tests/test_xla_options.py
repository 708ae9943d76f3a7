"""jit_options: the per-jit XLA options of the project's compiled steps exist in this jaxlib and only
change rounding."""

import jax
import numpy as np

from jax_impl import Net, jit_options, penalized_loss
from jax_impl.xla_options import CPU_COMPILER_OPTIONS


def test_cpu_gets_the_eigen_convolution_options_and_other_backends_none():
    assert jit_options("cpu") == {"compiler_options": CPU_COMPILER_OPTIONS}  # accepted by this jaxlib
    assert jit_options("gpu") == {} and jit_options("tpu") == {}
    jit_options("cpu")["compiler_options"]["extra"] = 1  # a fresh dict: the caller may extend it
    assert "extra" not in CPU_COMPILER_OPTIONS


def test_the_penalised_gradient_with_the_options_matches_the_default_up_to_float32_rounding():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 32, 32, 3), dtype=np.float32)
    y = np.arange(4, dtype=np.int32)
    params = Net().init(jax.random.key(0), x)["params"]

    def grads(p):
        return jax.grad(lambda q: penalized_loss(q, Net(), x, y, penalty_weight=10.0)[0])(p)

    got = jax.jit(grads, **jit_options("cpu"))(params)
    want = jax.jit(grads)(params)
    # Same products summed in another order by other kernels: float32 rounding (~1e-6 relative) only.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


def test_with_the_options_float32_penalty_terms_stay_within_1e_4_of_float64():
    """The Eigen kernels' float32 rounding, bounded against the float64 value of the same function.

    Measured 8.6e-6 (relu1) and 2e-8 (relu2) relative error with the options, 8e-8 with JAX's
    default kernels: 1e-4 leaves ~10x headroom and still catches a wrong kernel (errors of O(1)).
    """
    rng = np.random.default_rng(3)
    x = rng.random((7, 32, 32, 3))
    y = rng.integers(0, 10, 7).astype(np.int32)

    def terms(p, inputs):
        return penalized_loss(p, Net(), inputs, y, penalty_weight=10.0)[1]["penalty_terms"]

    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: a.astype(np.float64), Net().init(jax.random.key(0), x)["params"])
        want = jax.jit(terms)(params64, x)
    params32 = jax.tree.map(lambda a: np.asarray(a, np.float32), params64)
    got = jax.jit(terms, **jit_options("cpu"))(params32, x.astype(np.float32))
    for name in ("relu1", "relu2"):
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-4)
