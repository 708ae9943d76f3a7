"""Every convolution and pooling implementation equals the XLA reference, to second order, in float64.

The fast paths (``Conv2D(impl="canonical" | "im2col")``, ``max_pool_2x2``) exist
for speed only (see ``benchmarks/``); these tests pin them to
``lax.conv_general_dilated`` and to an argmax-based max-pool with PyTorch's
first-maximum tie rule: values, first derivatives and the second derivatives
that double backprop uses.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import Conv2D, Net, max_pool_2x2, penalized_loss
from jax_impl.layers import (
    CONV_IMPLS,
    ConvImpl,
    canonical_conv,
    conv2d_valid,
    conv_input_grad,
    conv_kernel_grad,
    resolve_conv_impl,
)
from parity_tests.harness import fast_jit
from tests._model_fixtures import normal, params_like

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
    x = normal((2, *image, ci), 0)
    kernel = normal(kernel_shape, 1)
    ct = normal((2, image[0] - kh + 1, image[1] - kw + 1, co), 2)
    c = normal(x.shape, 3)
    return x, kernel, ct, c


def double_backprop_objective(impl):
    """``||d <sin(conv(x, k)), ct> / d x||^2``-like scalar: differentiating it by (x, k) needs
    the second derivatives of the convolution, exactly as the penalised loss does."""

    def objective(x, kernel, ct):
        inner = jax.grad(lambda x: jnp.sum(jnp.sin(conv2d_valid(x, kernel, impl)) * ct))(x)
        return jnp.sum(inner**2 * jnp.cos(x))

    return objective


@functools.cache
def value_and_first_derivatives(impl):
    """``(conv(x, k), d <conv(x, k), ct> / d (x, k))`` with ``impl``, compiled once per impl (and
    shape): the XLA reference is shared by the cases that compare against it."""

    def f(x, kernel, ct):
        y, vjp = jax.vjp(lambda x, k: conv2d_valid(x, k, impl), x, kernel)
        return y, vjp(ct)

    return fast_jit(f)


@functools.cache
def second_derivatives(impl):
    """``d objective / d (x, k, ct)`` of ``double_backprop_objective(impl)``, compiled once per impl."""
    return fast_jit(jax.grad(double_backprop_objective(impl), argnums=(0, 1, 2)))


@pytest.mark.parametrize("impl", FAST_CONV_IMPLS)
@pytest.mark.parametrize("kernel_shape", [(5, 5, 3, 4), (3, 5, 2, 3)])
def test_conv_impl_matches_xla_in_value_and_first_derivatives(impl, kernel_shape):
    x, kernel, ct, _ = conv_operands(kernel_shape)
    y, grads = value_and_first_derivatives(impl)(x, kernel, ct)
    y_ref, grads_ref = value_and_first_derivatives("xla")(x, kernel, ct)
    close(y, y_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        close(got, want)


@pytest.mark.parametrize("impl", FAST_CONV_IMPLS)
def test_conv_impl_matches_xla_in_second_derivatives(impl):
    x, kernel, ct, _ = conv_operands()
    grads = second_derivatives(impl)(x, kernel, ct)
    grads_ref = second_derivatives("xla")(x, kernel, ct)
    for got, want in zip(grads, grads_ref, strict=True):
        close(got, want)


def test_canonical_conv_third_derivative_matches_xla():
    x, kernel, ct, _ = conv_operands((3, 3, 2, 2), (6, 5))

    def third(impl):
        second = jax.grad(double_backprop_objective(impl), argnums=1)
        return fast_jit(jax.grad(lambda k: jnp.sum(second(x, k, ct) ** 2)))(kernel)

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


def test_auto_conv_impl_is_onednn_or_canonical_on_cpu_and_xla_on_accelerators():
    from jax_impl import onednn_conv

    cpu = ConvImpl.ONEDNN if onednn_conv.available() else ConvImpl.CANONICAL
    assert resolve_conv_impl("auto", "cpu") is cpu
    assert resolve_conv_impl("auto", "gpu") is ConvImpl.XLA
    assert resolve_conv_impl("auto", "tpu") is ConvImpl.XLA
    assert resolve_conv_impl("im2col", "gpu") is ConvImpl.IM2COL
    assert resolve_conv_impl(ConvImpl.CANONICAL, "gpu") is ConvImpl.CANONICAL
    with pytest.raises(ValueError, match=r"conv impl must be one of .*'canonical'.*got 'fft'"):
        resolve_conv_impl("fft")
    assert set(CONV_IMPLS) == {"auto", "xla", "canonical", "im2col", "onednn"}


def test_the_cli_offers_the_library_s_conv_impls():
    from agp_common.config import CONV_IMPLS as CLI_CONV_IMPLS  # a plain tuple: the flags import no JAX

    assert CLI_CONV_IMPLS == CONV_IMPLS


def test_models_resolve_their_conv_impl_once_when_built():
    """The name becomes a ``ConvImpl`` at construction (and stays one through Flax's clones), so no
    name is resolved while the model is traced; the old names still compare equal."""
    net = Net(conv_impl="canonical")
    assert net.conv_impl is ConvImpl.CANONICAL and net.conv_impl == "canonical"
    assert Net().conv_impl is resolve_conv_impl("auto")
    assert Conv2D(4, impl="xla").impl is ConvImpl.XLA
    assert Net(conv_impl=ConvImpl.IM2COL).clone().conv_impl is ConvImpl.IM2COL
    with pytest.raises(ValueError, match="conv impl must be one of"):
        Net(conv_impl="fft")


@functools.cache
def net_penalised_value_and_grad(conv_impl):
    """``value_and_grad`` of the penalised loss (w = 10) of ``Net(conv_impl=...)``, compiled once."""
    return fast_jit(jax.value_and_grad(
        lambda p, x, y: penalized_loss(p, Net(conv_impl=conv_impl), x, y, penalty_weight=10.0)[0]))


@pytest.fixture(scope="module")
def net_case():
    """Float64 parameters and batch of the real Net at its smallest input (16x16; two channels, so
    conv1 mixes channels; batch 2), and its penalised loss and gradient with XLA's convolution, once.
    The property is about the layers inside Net, not about its size."""
    with jax.enable_x64(True):
        x, y = normal((2, 16, 16, 2), 4), jnp.array([0, 9])
        params = params_like(Net(), x)
        return params, x, y, net_penalised_value_and_grad("xla")(params, x, y)


@pytest.mark.parametrize("impl", [
    "canonical",
    # -m slow: im2col's derivatives to second order are checked above on the function itself, and
    # the plumbing of conv_impl through Net by "canonical"; on Net it adds one more compile (~2.5 s:
    # 25 patch slices differentiated twice) for the same code path.
    pytest.param("im2col", marks=pytest.mark.slow),
])
def test_net_penalised_gradient_is_the_same_for_every_conv_impl(impl, net_case):
    params, x, y, (total_ref, g_ref) = net_case
    total, g = net_penalised_value_and_grad(impl)(params, x, y)
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
    x = normal(shape, 5)
    return jnp.round(x) if ties else x


@functools.cache
def pool_value_and_vjp(pool):
    """``(pool(x), d <pool(x), ct> / d x)``, compiled once per pool function."""

    def f(x, ct):
        y, vjp = jax.vjp(pool, x)
        return y, vjp(ct)[0]

    return fast_jit(f)


#: d sum(max_pool_2x2(x)) / d x: one 1 per window, at the entry the gradient goes to.
window_choice = fast_jit(jax.grad(lambda x: max_pool_2x2(x).sum()))


@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_matches_reference_in_value_and_gradient(ties):
    x = pool_input(ties=ties)
    assert x.shape[1] % 2 == 1  # floor mode: the last row is dropped
    ct = normal((2, 3, 3, 3), 6)
    y, dx = pool_value_and_vjp(max_pool_2x2)(x, ct)
    y_ref, dx_ref = pool_value_and_vjp(reference_max_pool)(x, ct)
    close(y, y_ref)
    close(dx, dx_ref)


def test_max_pool_gradient_goes_to_the_first_maximum_of_a_tied_window():
    x = jnp.ones((1, 2, 2, 1), jnp.float64)  # all four tied
    np.testing.assert_array_equal(window_choice(x)[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])
    x = jnp.array([[1.0, 3.0], [3.0, 2.0]]).reshape(1, 2, 2, 1)  # tie between entries 1 and 2
    np.testing.assert_array_equal(window_choice(x)[0, :, :, 0], [[0.0, 1.0], [0.0, 0.0]])


def test_max_pool_second_derivatives_match_reference():
    x = pool_input(ties=True)
    ct = normal((2, 3, 3, 3), 7)

    def objective(pool):
        def f(x, ct):
            g = jax.vjp(pool, x)[1](ct)[0]
            return jnp.sum(jnp.sin(g) * x) + jnp.sum(pool(x) ** 3)
        return fast_jit(jax.grad(f, argnums=(0, 1)))

    got = objective(max_pool_2x2)(x, ct)
    want = objective(reference_max_pool)(x, ct)
    for g, w in zip(got, want, strict=True):
        close(g, w)


def test_max_pool_forward_mode_matches_reference():
    # max_pool_2x2 has a custom_jvp, so forward mode (jax.jvp, jax.hessian) must agree too.
    x = pool_input(ties=True)
    dx = normal(x.shape, 8)

    def jvp(pool):
        return fast_jit(lambda x, dx: jax.jvp(pool, (x,), (dx,)))(x, dx)

    (y, dy), (y_ref, dy_ref) = jvp(max_pool_2x2), jvp(reference_max_pool)
    close(y, y_ref)
    close(dy, dy_ref)


def test_max_pool_gradient_ignores_infinities_outside_the_chosen_entry():
    # The backward pass selects with where, not mask * ct: 0 * inf would give NaN.
    x = jnp.array([[jnp.inf, jnp.inf], [1.0, -jnp.inf]]).reshape(1, 2, 2, 1)
    np.testing.assert_array_equal(window_choice(x)[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_max_pool_propagates_nan_like_pytorch():
    x = jnp.array([[1.0, jnp.nan], [5.0, 2.0]]).reshape(1, 2, 2, 1)
    assert jnp.isnan(max_pool_2x2(x)).all()
