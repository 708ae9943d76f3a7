"""Every convolution and pooling implementation equals the XLA reference, to second order, in float64.

The fast paths (``Conv2D(impl="canonical" | "im2col")``, ``max_pool_2x2``) exist
for speed only (see ``benchmarks/``); these tests pin them to
``lax.conv_general_dilated`` and to an argmax-based max-pool with PyTorch's
first-maximum tie rule: values, first derivatives and the second derivatives
that double backprop uses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import Net, max_pool_2x2, penalized_loss
from jax_impl.layers import (
    CONV_IMPLS,
    canonical_conv,
    conv2d_valid,
    conv_input_grad,
    conv_kernel_grad,
    resolve_conv_impl,
)

# float64 throughout: the implementations differ only in summation order, so
# ~1e-13 relative differences are rounding; 1e-10 is the project's parity bar.
RTOL, ATOL = 1e-10, 1e-12
FAST_CONV_IMPLS = ("canonical", "im2col")


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


def conv_operands(kernel_shape=(5, 5, 3, 4), image=(9, 8)):
    """A non-square image and kernel, so transposed axes cannot go unnoticed."""
    kh, kw, ci, co = kernel_shape
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (2, *image, ci), jnp.float64)
    kernel = jax.random.normal(keys[1], kernel_shape, jnp.float64)
    out = (2, image[0] - kh + 1, image[1] - kw + 1, co)
    ct = jax.random.normal(keys[2], out, jnp.float64)
    c = jax.random.normal(keys[3], x.shape, jnp.float64)
    return x, kernel, ct, c


def double_backprop_objective(impl):
    """``||d <sin(conv(x, k)), ct> / d x||^2``-like scalar: differentiating it by (x, k) needs
    the second derivatives of the convolution, exactly as the penalised loss does."""

    def objective(x, kernel, ct):
        inner = jax.grad(lambda x: jnp.sum(jnp.sin(conv2d_valid(x, kernel, impl)) * ct))(x)
        return jnp.sum(inner**2 * jnp.cos(x))

    return objective


@pytest.mark.parametrize("impl", FAST_CONV_IMPLS)
@pytest.mark.parametrize("kernel_shape", [(5, 5, 3, 4), (3, 5, 2, 3)])
def test_conv_impl_matches_xla_in_value_and_first_derivatives(impl, kernel_shape):
    x, kernel, ct, _ = conv_operands(kernel_shape)
    y, vjp = jax.vjp(lambda x, k: conv2d_valid(x, k, impl), x, kernel)
    y_ref, vjp_ref = jax.vjp(lambda x, k: conv2d_valid(x, k, "xla"), x, kernel)
    close(y, y_ref)
    for got, want in zip(vjp(ct), vjp_ref(ct), strict=True):
        close(got, want)


@pytest.mark.parametrize("impl", FAST_CONV_IMPLS)
def test_conv_impl_matches_xla_in_second_derivatives(impl):
    x, kernel, ct, _ = conv_operands()
    grads = jax.grad(double_backprop_objective(impl), argnums=(0, 1, 2))(x, kernel, ct)
    grads_ref = jax.grad(double_backprop_objective("xla"), argnums=(0, 1, 2))(x, kernel, ct)
    for got, want in zip(grads, grads_ref, strict=True):
        close(got, want)


def test_canonical_conv_third_derivative_matches_xla():
    x, kernel, ct, _ = conv_operands((3, 3, 2, 2), (6, 5))

    def third(impl):
        second = jax.grad(double_backprop_objective(impl), argnums=1)
        return jax.grad(lambda k: jnp.sum(second(x, k, ct) ** 2))(kernel)

    close(third("canonical"), third("xla"))


def test_canonical_products_are_the_adjoints_of_the_convolution():
    # <conv(x, k), ct> == <x, input_grad(ct, k)> == <k, kernel_grad(x, ct)>
    x, kernel, ct, _ = conv_operands((3, 5, 2, 3))
    lhs = jnp.vdot(conv2d_valid(x, kernel, "xla"), ct)
    close(jnp.vdot(x, conv_input_grad(ct, kernel)), lhs)
    close(jnp.vdot(kernel, conv_kernel_grad(x, ct)), lhs)


def test_canonical_conv_has_no_forward_mode_and_says_so():
    x, kernel, _, _ = conv_operands()
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda k: canonical_conv(x, k), (kernel,), (kernel,))


def test_auto_conv_impl_is_canonical_on_cpu_and_xla_on_accelerators():
    assert resolve_conv_impl("auto", "cpu") == "canonical"
    assert resolve_conv_impl("auto", "gpu") == "xla"
    assert resolve_conv_impl("auto", "tpu") == "xla"
    assert resolve_conv_impl("im2col", "gpu") == "im2col"
    with pytest.raises(ValueError, match=r"conv impl must be one of .*'canonical'.*got 'fft'"):
        resolve_conv_impl("fft")
    assert set(CONV_IMPLS) == {"auto", "xla", "canonical", "im2col"}


@pytest.mark.parametrize("impl", FAST_CONV_IMPLS)
def test_net_penalised_gradient_is_the_same_for_every_conv_impl(impl):
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3), jnp.float64)
    y = jnp.array([0, 3, 9])
    params = Net().init(jax.random.key(2), x)["params"]

    def grads(conv_impl):
        def loss(p):
            return penalized_loss(p, Net(conv_impl=conv_impl), x, y, penalty_weight=10.0)[0]

        return jax.value_and_grad(loss)(params)

    (total, g), (total_ref, g_ref) = grads(impl), grads("xla")
    close(total, total_ref)
    jax.tree.map(close, g, g_ref)


# ------------------------------------------------------------------ max pooling


def reference_max_pool(x):
    """2x2/2 max-pool by argmax over each window's entries in row-major order.

    ``jnp.argmax`` returns the first maximal index, so the gradient (through
    ``take_along_axis``) goes to the first maximum, PyTorch's tie rule.
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    windows = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)  # (..., c, 2, 2)
    windows = windows.reshape(b, h // 2, w // 2, c, 4)  # row-major order within the window
    first = jnp.argmax(windows, axis=-1)[..., None]
    return jnp.take_along_axis(windows, first, axis=-1)[..., 0]


def pool_input(shape=(2, 7, 6, 3), ties=True):
    """Random values, optionally rounded to a coarse grid so that many windows hold ties."""
    x = jax.random.normal(jax.random.key(3), shape, jnp.float64)
    return jnp.round(x) if ties else x


@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_matches_reference_in_value_and_gradient(ties):
    x = pool_input(ties=ties)
    assert x.shape[1] % 2 == 1  # floor mode: the last row is dropped
    ct = jax.random.normal(jax.random.key(4), (2, 3, 3, 3), jnp.float64)
    y, vjp = jax.vjp(max_pool_2x2, x)
    y_ref, vjp_ref = jax.vjp(reference_max_pool, x)
    close(y, y_ref)
    close(vjp(ct)[0], vjp_ref(ct)[0])


def test_max_pool_gradient_goes_to_the_first_maximum_of_a_tied_window():
    x = jnp.ones((1, 2, 2, 1), jnp.float64)  # all four tied
    grad = jax.grad(lambda x: max_pool_2x2(x).sum())(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])
    x = jnp.array([[1.0, 3.0], [3.0, 2.0]]).reshape(1, 2, 2, 1)  # tie between entries 1 and 2
    grad = jax.grad(lambda x: max_pool_2x2(x).sum())(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[0.0, 1.0], [0.0, 0.0]])


def test_max_pool_second_derivatives_match_reference():
    x = pool_input(ties=True)
    ct = jax.random.normal(jax.random.key(5), (2, 3, 3, 3), jnp.float64)

    def objective(pool):
        def f(x, ct):
            g = jax.vjp(pool, x)[1](ct)[0]
            return jnp.sum(jnp.sin(g) * x) + jnp.sum(pool(x) ** 3)
        return f

    got = jax.grad(objective(max_pool_2x2), argnums=(0, 1))(x, ct)
    want = jax.grad(objective(reference_max_pool), argnums=(0, 1))(x, ct)
    for g, w in zip(got, want, strict=True):
        close(g, w)


def test_max_pool_forward_mode_matches_reference():
    # max_pool_2x2 has a custom_jvp, so forward mode (jax.jvp, jax.hessian) must agree too.
    x = pool_input(ties=True)
    dx = jax.random.normal(jax.random.key(6), x.shape, jnp.float64)
    y, dy = jax.jvp(max_pool_2x2, (x,), (dx,))
    y_ref, dy_ref = jax.jvp(reference_max_pool, (x,), (dx,))
    close(y, y_ref)
    close(dy, dy_ref)


def test_max_pool_gradient_ignores_infinities_outside_the_chosen_entry():
    # The backward pass selects with where, not mask * ct: 0 * inf would give NaN.
    x = jnp.array([[jnp.inf, jnp.inf], [1.0, -jnp.inf]]).reshape(1, 2, 2, 1)
    grad = jax.grad(lambda x: max_pool_2x2(x).sum())(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_max_pool_propagates_nan_like_pytorch():
    x = jnp.array([[1.0, jnp.nan], [5.0, 2.0]]).reshape(1, 2, 2, 1)
    assert jnp.isnan(max_pool_2x2(x)).all()
