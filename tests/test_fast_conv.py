"""``fast_convolutions``: any ``flax.linen.Conv`` computed as pad + stride-1 VALID convolution.

Every check compares against flax's own ``nn.Conv`` (``lax.conv_general_dilated``
with XLA's autodiff), the independent reference, in float64: the two
formulations differ only in summation order, so values, first and second
derivatives agree to ~1e-12. Shapes are tiny to keep the module fast.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import conv_general, fast_conv, penalized_loss
from jax_impl.fast_conv import fast_convolutions

# float64: only summation order differs between the formulations.
RTOL64, ATOL64 = 1e-11, 1e-12


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _normal(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _fast_path(jaxpr: str) -> bool:
    """Whether a jaxpr was computed by the fast path: closed-rule convolutions, or patches and a matmul."""
    return "canonical_conv" in jaxpr or "grouped" in jaxpr or (
        "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr)


@pytest.fixture(params=["conv+space_to_depth", "conv+polyphase", "im2col+polyphase"])
def path(request, monkeypatch):
    """Both stride-1 products (closed-rule convolution, patches + matmul) and both strided forms."""
    product, strided = request.param.split("+")
    monkeypatch.setattr(conv_general, "IM2COL_MAX_OUTPUT_PIXELS", 0 if product == "conv" else 10**9)
    monkeypatch.setattr(conv_general, "POLYPHASE_MIN_CHANNELS", 0 if strided == "polyphase" else 10**9)
    return request.param


def _values(conv: nn.Module, x: jax.Array, impl="canonical") -> tuple[jax.Array, jax.Array, str]:
    """(flax's output, the intercepted output, the intercepted jaxpr) for the same variables."""
    variables = conv.init(jax.random.key(0), x)
    expected = jax.jit(conv.apply)(variables, x)
    with fast_convolutions(True, impl=impl):  # traced (and so intercepted) inside
        actual = jax.jit(conv.apply)(variables, x)
        jaxpr = str(jax.make_jaxpr(conv.apply)(variables, x))
    return expected, actual, jaxpr


CONVS_2D = {
    "same_stride2": dict(kernel_size=(3, 3), strides=2, padding="SAME"),
    "valid_stride_2x1": dict(kernel_size=(3, 2), strides=(2, 1), padding="VALID"),
    "int_padding_stride3": dict(kernel_size=(4, 4), strides=3, padding=1),
    "negative_pairs": dict(kernel_size=(2, 3), padding=((2, 0), (1, -1))),
    "circular_dilated": dict(kernel_size=(3, 3), padding="CIRCULAR", kernel_dilation=2),
    "reflect_stride2": dict(kernel_size=(3, 3), strides=2, padding="REFLECT"),
    "same_dilated_stride2_grouped": dict(kernel_size=(3, 3), strides=2, kernel_dilation=2,
                                         feature_group_count=2),
    "depthwise_no_bias": dict(kernel_size=(3, 3), feature_group_count=4, use_bias=False),
    "strided_1x1": dict(kernel_size=(1, 1), strides=2, use_bias=False),
}


@pytest.mark.parametrize("name", CONVS_2D)
def test_intercepted_conv2d_equals_flax(name, path):
    conv = nn.Conv(features=4, param_dtype=jnp.float64, **CONVS_2D[name])
    expected, actual, jaxpr = _values(conv, _normal(0, (2, 9, 8, 4)))
    assert _fast_path(jaxpr)
    if conv.feature_group_count == 1 and conv.kernel_size != (1, 1):  # the product the fixture chose ran
        # (grouped convolutions have their own products, 1x1 kernels are always a matmul)
        assert ("canonical_conv" in jaxpr) == path.startswith("conv+")
    np.testing.assert_allclose(actual, expected, rtol=RTOL64, atol=ATOL64)


@pytest.mark.parametrize("padding", ["CAUSAL", "SAME", 2])
def test_intercepted_conv1d_with_extra_batch_axes_equals_flax(padding, path):
    conv = nn.Conv(3, (3,), strides=2, padding=padding, kernel_dilation=2, param_dtype=jnp.float64)
    expected, actual, jaxpr = _values(conv, _normal(1, (2, 3, 11, 2)))  # two batch axes
    assert _fast_path(jaxpr)
    np.testing.assert_allclose(actual, expected, rtol=RTOL64, atol=ATOL64)


def test_unbatched_input_equals_flax():
    conv = nn.Conv(3, (3, 3), strides=2, param_dtype=jnp.float64)
    expected, actual, jaxpr = _values(conv, _normal(11, (7, 6, 2)))  # no batch axis: flax adds one
    assert _fast_path(jaxpr)
    np.testing.assert_allclose(actual, expected, rtol=RTOL64, atol=ATOL64)


def test_float32_and_onednn_agree_with_flax():
    conv = nn.Conv(8, (3, 3), strides=2, padding="SAME")
    expected, actual, _ = _values(conv, _normal(2, (2, 10, 10, 3)).astype(jnp.float32), impl="auto")
    # float32 rounding of a 27-term sum of O(1) terms: ~1e-6 relative.
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_dtype_promotion_follows_the_module():
    conv = nn.Conv(4, (3, 3), strides=2, dtype=jnp.float32, param_dtype=jnp.float64)
    expected, actual, _ = _values(conv, _normal(3, (2, 8, 8, 2)))
    assert actual.dtype == expected.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)  # float32 rounding


@pytest.mark.parametrize("conv", [
    nn.Conv(4, (3, 3), padding=1, input_dilation=2, param_dtype=jnp.float64),
    nn.Conv(4, (3, 3), mask=jnp.ones((3, 3, 2, 4)), param_dtype=jnp.float64),
    nn.ConvTranspose(4, (3, 3), strides=(2, 2), param_dtype=jnp.float64),
    nn.Conv(4, (3, 3, 3), param_dtype=jnp.float64),
    nn.ConvLocal(4, (3, 3), strides=2, param_dtype=jnp.float64),  # unshared weights: not a convolution's
], ids=["input_dilation", "mask", "transpose", "conv3d", "local"])
def test_unsupported_convolutions_run_flax_unchanged(conv):
    x = _normal(4, (2, 6, 6, 6, 2) if conv.kernel_size == (3, 3, 3) else (2, 6, 6, 2))
    expected, actual, jaxpr = _values(conv, x)
    assert not _fast_path(jaxpr)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=0)  # the same program


def test_parameters_are_created_as_flax_creates_them():
    conv = nn.Conv(4, (3, 3), strides=2, feature_group_count=2, param_dtype=jnp.float64)
    x = _normal(5, (2, 8, 8, 4))
    plain = conv.init(jax.random.key(7), x)
    with fast_convolutions(True):
        fast = conv.init(jax.random.key(7), x)
    assert jax.tree.structure(plain) == jax.tree.structure(fast)
    jax.tree.map(functools.partial(np.testing.assert_array_equal), plain, fast)


def test_grouped_products_have_xlas_derivatives_to_second_order():
    x, kernel = _normal(6, (2, 6, 5, 4)), _normal(7, (3, 2, 2, 6))  # 2 groups: 4 -> 6 channels
    products = fast_conv.grouped_products(2)

    def reference(a, k):
        return jax.lax.conv_general_dilated(a, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=2)

    def penalty(conv, k):  # ||d <tanh(conv(x, k)), 1> / dx||^2: the input-gradient chain the penalty uses
        g = jax.grad(lambda a: jnp.sum(jnp.tanh(conv(a, k))))(x)
        return jnp.sum(g**2)

    np.testing.assert_allclose(products.forward(x, kernel), reference(x, kernel), rtol=RTOL64, atol=ATOL64)
    np.testing.assert_allclose(jax.grad(penalty, 1)(products.forward, kernel),
                               jax.grad(penalty, 1)(reference, kernel), rtol=RTOL64, atol=ATOL64)


class _SmallNet(nn.Module):
    """Strided SAME, dilated, grouped, with and without bias: every path of the interceptor once."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME", param_dtype=jnp.float64)(x))
        x = nn.tanh(nn.Conv(4, (3, 3), kernel_dilation=2, feature_group_count=2, use_bias=False,
                            param_dtype=jnp.float64)(x))
        x = nn.Conv(6, (1, 1), strides=2, padding="VALID", param_dtype=jnp.float64)(x)
        return nn.Dense(3, param_dtype=jnp.float64)(x.reshape(x.shape[0], -1))


def test_penalised_training_gradient_equals_flaxs(path):
    model, x, y = _SmallNet(), _normal(8, (3, 11, 11, 2)), jnp.array([0, 2, 1])
    params = model.init(jax.random.key(1), x)["params"]

    def total(p, fast):
        return penalized_loss(p, model, x, y, penalty_weight=3.0, layers="input", fast_convolutions=fast)[0]

    value_and_grad = jax.jit(jax.value_and_grad(total), static_argnums=1)  # one program per variant
    (fast_total, fast), (plain_total, plain) = value_and_grad(params, True), value_and_grad(params, False)
    np.testing.assert_allclose(fast_total, plain_total, rtol=RTOL64, atol=ATOL64)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=RTOL64, atol=ATOL64), fast, plain)


def test_penalized_loss_uses_fast_convolutions_on_cpu_unless_turned_off():
    model, x, y = _SmallNet(), _normal(9, (2, 9, 9, 2)), jnp.array([0, 1])
    params = model.init(jax.random.key(2), x)["params"]

    def jaxpr(fast):
        loss = functools.partial(penalized_loss, model=model, penalty_weight=1.0, layers="input",
                                 fast_convolutions=fast)
        return str(jax.make_jaxpr(lambda p: jax.grad(lambda q: loss(q, x=x, y=y)[0])(p))(params))

    assert jax.default_backend() == "cpu"
    assert "conv_general_dilated" in jaxpr(False) and "lhs_dilation=(2, 2)" in jaxpr(False)
    assert "lhs_dilation=(2, 2)" not in jaxpr(True)  # no dilated (slow) convolution left


def test_disabled_context_changes_nothing():
    conv = nn.Conv(4, (3, 3), strides=2, param_dtype=jnp.float64)
    x = _normal(10, (1, 6, 6, 2))
    variables = conv.init(jax.random.key(0), x)
    with fast_convolutions(False):
        jaxpr = str(jax.make_jaxpr(conv.apply)(variables, x))
    assert not _fast_path(jaxpr)
