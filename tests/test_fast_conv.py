"""``fast_convolutions``: any ``flax.linen.Conv`` computed as pad + stride-1 VALID convolution.

Every check compares against flax's own ``nn.Conv`` (``lax.conv_general_dilated``
with XLA's autodiff), the independent reference, in float64: the two
formulations differ only in summation order, so values, first and second
derivatives agree to ~1e-12. Shapes are tiny, and each group of cases is one
compiled program (``fast_jit``: XLA's fixed cost per compile is most of the time).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import conv_general, fast_conv, onednn_conv, penalized_loss
from jax_impl.fast_conv import fast_convolutions
from parity_tests.harness import fast_jit
from tests._model_fixtures import check_each, fast_path, params_like, variables_like

# float64: only summation order differs between the formulations.
RTOL64, ATOL64 = 1e-11, 1e-12


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _normal(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


@pytest.fixture(params=["conv+space_to_depth", "conv+polyphase", "im2col+polyphase"])
def path(request, monkeypatch):
    """Both stride-1 products (closed-rule convolution, patches + matmul) and both strided forms."""
    product, strided = request.param.split("+")
    monkeypatch.setattr(conv_general, "IM2COL_MAX_OUTPUT_PIXELS", 0 if product == "conv" else 10**9)
    monkeypatch.setattr(conv_general, "POLYPHASE_MIN_CHANNELS", 0 if strided == "polyphase" else 10**9)
    return request.param


class _Case(NamedTuple):
    """One convolution to compare: the module, its input, the implementation the interceptor is given."""

    conv: nn.Module
    x: jax.Array
    impl: str = "canonical"


def _compare(cases: dict[str, _Case]) -> dict[str, tuple[jax.Array, jax.Array, str]]:
    """``{name: (flax's output, the intercepted output, the intercepted jaxpr)}``, the same variables in both.

    Every output comes from ONE compiled program: XLA's fixed cost per compilation (~0.3 s) is most of
    the time of such tiny convolutions, so one program per group replaces two per case. Variables are
    drawn by NumPy (``variables_like``: no ``jax.random`` compiles), biases non-zero.
    """
    variables = {name: variables_like(case.conv, case.x, dtype=case.conv.param_dtype)
                 for name, case in cases.items()}

    @fast_jit
    def outputs(variables, inputs):
        expected = {name: case.conv.apply(variables[name], inputs[name]) for name, case in cases.items()}
        actual = {}
        for name, case in cases.items():
            with fast_convolutions(True, impl=case.impl):  # traced (and so intercepted) inside
                actual[name] = case.conv.apply(variables[name], inputs[name])
        return expected, actual

    expected, actual = outputs(variables, {name: case.x for name, case in cases.items()})
    jaxprs = {}
    for name, case in cases.items():
        with fast_convolutions(True, impl=case.impl):
            jaxprs[name] = str(jax.make_jaxpr(case.conv.apply)(variables[name], case.x))
    return {name: (expected[name], actual[name], jaxprs[name]) for name in cases}


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


def test_intercepted_convolutions_equal_flax(path):
    """Each 2-D configuration, 1-D ones on two batch axes and an unbatched input, under the product and
    strided form that ``path`` forces: the fast path ran, the product chosen ran, values equal flax's."""
    cases = {f"conv2d_{name}": _Case(nn.Conv(features=4, param_dtype=jnp.float64, **keywords),
                                      _normal(0, (2, 9, 8, 4)))
             for name, keywords in CONVS_2D.items()}
    cases |= {f"conv1d_two_batch_axes_padding={padding}":
              _Case(nn.Conv(3, (3,), strides=2, padding=padding, kernel_dilation=2, param_dtype=jnp.float64),
                    _normal(1, (2, 3, 11, 2)))
              for padding in ["CAUSAL", "SAME", 2]}
    cases["unbatched"] = _Case(nn.Conv(3, (3, 3), strides=2, param_dtype=jnp.float64),
                               _normal(11, (7, 6, 2)))  # no batch axis: flax adds one
    results = _compare(cases)

    def check(name):
        expected, actual, jaxpr = results[name]
        conv = cases[name].conv
        assert fast_path(jaxpr)
        if conv.feature_group_count == 1 and conv.kernel_size != (1, 1):
            # the product the fixture chose ran (grouped convolutions have their own products, 1x1
            # kernels are always a matmul)
            assert ("canonical_conv" in jaxpr) == path.startswith("conv+"), "not the product forced"
        np.testing.assert_allclose(actual, expected, rtol=RTOL64, atol=ATOL64)

    check_each(cases, check)


def test_float32_onednn_and_dtype_promotion_agree_with_flax():
    """float32 with ``impl="auto"`` (oneDNN where built); float64 parameters in a float32 module."""
    cases = {
        "float32_auto": _Case(nn.Conv(8, (3, 3), strides=2, padding="SAME"),  # 10x10 outputs: not im2col
                              _normal(2, (2, 20, 20, 3)).astype(jnp.float32), impl="auto"),
        "promotion": _Case(nn.Conv(4, (3, 3), strides=2, dtype=jnp.float32, param_dtype=jnp.float64),
                           _normal(3, (2, 8, 8, 2))),
    }
    results = _compare(cases)

    def check(name):
        expected, actual, jaxpr = results[name]
        if name == "float32_auto" and onednn_conv.available():
            assert "agp_onednn_conv_forward" in jaxpr, "oneDNN is built but did not run"
        assert actual.dtype == expected.dtype == jnp.float32
        # float32 rounding of a <= 27-term sum of O(1) terms: ~1e-6 relative.
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)

    check_each(cases, check)


UNSUPPORTED = {
    "input_dilation": nn.Conv(4, (3, 3), padding=1, input_dilation=2, param_dtype=jnp.float64),
    "mask": nn.Conv(4, (3, 3), mask=jnp.ones((3, 3, 2, 4)), param_dtype=jnp.float64),
    "transpose": nn.ConvTranspose(4, (3, 3), strides=(2, 2), param_dtype=jnp.float64),
    "conv3d": nn.Conv(4, (3, 3, 3), param_dtype=jnp.float64),
    "local": nn.ConvLocal(4, (3, 3), strides=2, param_dtype=jnp.float64),  # unshared weights: not a conv
}


def test_unsupported_convolutions_run_flax_unchanged():
    cases = {name: _Case(conv, _normal(4, (2, 6, 6, 6, 2) if name == "conv3d" else (2, 6, 6, 2)))
             for name, conv in UNSUPPORTED.items()}
    results = _compare(cases)

    def check(name):
        expected, actual, jaxpr = results[name]
        assert not fast_path(jaxpr)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=0)  # the same program

    check_each(cases, check)


def test_parameters_are_created_as_flax_creates_them():
    conv = nn.Conv(4, (3, 3), strides=2, feature_group_count=2, param_dtype=jnp.float64)
    x = _normal(5, (2, 8, 8, 4))

    @fast_jit  # both in one program (eagerly, each random draw is compiled on its own)
    def both(key):
        plain = conv.init(key, x)
        with fast_convolutions(True):
            fast = conv.init(key, x)
        return plain, fast

    plain, fast = both(jax.random.key(7))
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

    @fast_jit  # one program (eagerly, each primitive compiled on its own)
    def values(k):
        return ((products.forward(x, k), reference(x, k)),
                (jax.grad(penalty, 1)(products.forward, k), jax.grad(penalty, 1)(reference, k)))

    (forward, expected_forward), (grad, expected_grad) = values(kernel)
    np.testing.assert_allclose(forward, expected_forward, rtol=RTOL64, atol=ATOL64)
    np.testing.assert_allclose(grad, expected_grad, rtol=RTOL64, atol=ATOL64)


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
    params = params_like(model, x, seed=1)

    def total(p, fast):
        return penalized_loss(p, model, x, y, penalty_weight=3.0, layers="input", fast_convolutions=fast)[0]

    @fast_jit  # both variants in one program: one compilation
    def both(p):
        return jax.value_and_grad(total)(p, True), jax.value_and_grad(total)(p, False)

    (fast_total, fast), (plain_total, plain) = both(params)
    np.testing.assert_allclose(fast_total, plain_total, rtol=RTOL64, atol=ATOL64)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=RTOL64, atol=ATOL64), fast, plain)


def test_penalized_loss_uses_fast_convolutions_on_cpu_unless_turned_off():
    model, x, y = _SmallNet(), _normal(9, (2, 9, 9, 2)), jnp.array([0, 1])
    params = params_like(model, x, seed=2)

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
    variables = variables_like(conv, x)
    with fast_convolutions(False):
        jaxpr = str(jax.make_jaxpr(conv.apply)(variables, x))
    assert not fast_path(jaxpr)
