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
