"""``jax_impl.nnx.fast_convolutions``: any ``flax.nnx.Conv`` computed as pad + stride-1 VALID convolution.

Every check compares against flax's own ``nnx.Conv`` (``lax.conv_general_dilated``
with XLA's autodiff), the independent reference, in float64: the two
formulations differ only in summation order, so values and the penalised
training gradients agree to ~1e-12. The numerics of each strided/padded form
are proved for Linen in tests/test_fast_conv.py; these prove NNX's glue
(parameters, promotion, batch axes, the hooks of ``penalized_loss``), that the
fast path really ran (its primitives are in the jaxpr), and that the user's
model is left as it was. Weights come from ``nnx_like`` (no ``jax.random`` compiles), and each
group of cases is one compiled program (``fast_jit``: XLA's fixed cost per compile is most of the time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_impl import nnx as jnnx
from jax_impl import onednn_conv
from parity_tests.harness import fast_jit
from tests._model_fixtures import check_each, fast_path, nnx_like, normal

# float64: only summation order differs between the formulations.
RTOL64, ATOL64 = 1e-11, 1e-12


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _compare(convs: dict[str, nnx.Module], inputs: dict[str, jax.Array]) -> dict[str, tuple]:
    """``{name: (flax's output, the fast output, the fast jaxpr)}`` of the same modules, every output from
    ONE compiled program (one compilation per group instead of two per case)."""

    @fast_jit
    def outputs(inputs):
        expected = {name: conv(inputs[name]) for name, conv in convs.items()}
        actual = {}
        for name, conv in convs.items():  # one context at a time: an inner one replaces the outer's hooks
            with jnnx.fast_convolutions(conv, True, impl="canonical"):  # traced (and so hooked) inside
                actual[name] = conv(inputs[name])
        return expected, actual

    expected, actual = outputs(inputs)
    jaxprs = {}
    for name, conv in convs.items():
        with jnnx.fast_convolutions(conv, True, impl="canonical"):
            jaxprs[name] = str(jax.make_jaxpr(lambda a, conv=conv: conv(a))(inputs[name]))
    for name, conv in convs.items():
        assert type(conv) in (nnx.Conv, nnx.ConvTranspose, _OwnCall), name  # the class is restored
    return {name: (expected[name], actual[name], jaxprs[name]) for name in convs}


CONVS = {  # (in, out, kernel_size, keywords, input shape)
    "same_stride2": (4, 4, (3, 3), dict(strides=2, padding="SAME"), (2, 9, 8, 4)),
    "valid_stride1": (2, 3, (3, 2), dict(padding="VALID"), (2, 12, 11, 2)),
    "explicit_stride2_no_bias": (2, 4, (4, 4), dict(strides=2, padding=((1, 2), (0, 1)), use_bias=False),
                                 (2, 9, 9, 2)),
    "dilated_grouped": (4, 6, (3, 3), dict(kernel_dilation=2, feature_group_count=2), (2, 10, 9, 4)),
    "circular": (2, 3, (3, 3), dict(padding="CIRCULAR"), (2, 7, 7, 2)),
    "causal_1d_two_batch_axes": (2, 3, (3,), dict(padding="CAUSAL", kernel_dilation=2), (2, 3, 11, 2)),
    "unbatched_stride2": (2, 3, (3, 3), dict(strides=2), (7, 6, 2)),
}


def test_fast_nnx_convs_equal_flax():
    convs = {name: nnx_like(lambda rngs, cin=cin, cout=cout, kernel_size=kernel_size, keywords=keywords:
                            nnx.Conv(cin, cout, kernel_size, param_dtype=jnp.float64, rngs=rngs, **keywords),
                            dtype=np.float64)
             for name, (cin, cout, kernel_size, keywords, _) in CONVS.items()}
    results = _compare(convs, {name: normal(shape, 0) for name, (*_, shape) in CONVS.items()})

    def check(name):
        expected, actual, jaxpr = results[name]
        assert fast_path(jaxpr)
        np.testing.assert_allclose(actual, expected, rtol=RTOL64, atol=ATOL64)

    check_each(CONVS, check)


def test_nested_contexts_keep_the_enclosing_models_convolutions_fast():
    """An inner ``fast_convolutions`` (another model, or the same one again) keeps the outer one's hooks,
    and each context restores only the classes it swapped."""
    first, second = (nnx_like(lambda rngs: nnx.Conv(2, 2, (3, 3), strides=2, rngs=rngs), dtype=np.float64)
                     for _ in range(2))
    x = normal((2, 8, 8, 2), 2)
    with jnnx.fast_convolutions(first, True, impl="canonical"):
        with jnnx.fast_convolutions(second, True, impl="canonical"):
            both = str(jax.make_jaxpr(lambda a: second(first(a)))(x))
            with jnnx.fast_convolutions(first, True, impl="canonical"):  # the same model again
                again = str(jax.make_jaxpr(lambda a: first(a))(x))  # a new function: no cached trace
            hooked = type(first)
        assert type(second) is nnx.Conv and hooked is type(first) is not nnx.Conv
        after_inner = str(jax.make_jaxpr(lambda a: first(a))(x))
    assert type(first) is nnx.Conv
    for jaxpr in (both, again, after_inner):
        assert "conv_general_dilated" not in jaxpr and fast_path(jaxpr)
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda a: first(a))(x))  # flax's own after them


class _OwnCall(nnx.Conv):
    """A subclass with its own ``__call__``: the fast path must not replace it."""

    def __call__(self, inputs):
        return 2.0 * super().__call__(inputs)


UNSUPPORTED = {
    "input_dilation": lambda rngs: nnx.Conv(2, 4, (3, 3), padding=1, input_dilation=2, rngs=rngs),
    "mask": lambda rngs: nnx.Conv(2, 4, (3, 3), rngs=rngs),  # mask set below: nnx_like builds abstractly
    "transpose": lambda rngs: nnx.ConvTranspose(2, 4, (3, 3), strides=2, rngs=rngs),
    "own_call": lambda rngs: _OwnCall(2, 4, (3, 3), rngs=rngs),
}


def test_unsupported_nnx_convolutions_run_flax_unchanged():
    convs = {name: nnx_like(make, dtype=np.float64) for name, make in UNSUPPORTED.items()}
    convs["mask"].mask = nnx.data(jnp.ones((3, 3, 2, 4)))
    results = _compare(convs, {name: normal((2, 6, 6, 2), 1) for name in convs})

    def check(name):
        expected, actual, jaxpr = results[name]
        assert not fast_path(jaxpr)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=0)  # the same program

    check_each(convs, check)


class _SmallNet(nnx.Module):
    """Strided SAME, dilated + grouped without bias, explicit padding, strided 1x1: each NNX path once."""

    def __init__(self, *, rngs):
        self.conv1 = nnx.Conv(2, 4, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, (3, 3), kernel_dilation=2, feature_group_count=2, use_bias=False,
                              padding=((2, 1), (1, 2)), rngs=rngs)
        self.conv3 = nnx.Conv(4, 6, (1, 1), strides=2, padding="VALID", rngs=rngs)
        self.head = nnx.Linear(6 * 3 * 3, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))  # (B, 6, 6, 4)
        x = jnnx.capture(self, "act", nnx.tanh(self.conv2(x)))  # (B, 5, 5, 4)
        x = self.conv3(x)  # (B, 3, 3, 6)
        return self.head(x.reshape(x.shape[0], -1))


def _penalised_grads(model, x, y) -> tuple[dict[bool, tuple], dict[bool, str]]:
    """``{fast: (total, grads)}`` (both variants from one compiled program) and ``{fast: jaxpr}`` of the
    NNX penalised loss on every capture point: the input, a ``capture()`` point and a conv's output by
    path (so the capture hooks wrap the fast convolution)."""
    graphdef, state = nnx.split(model)

    def value_and_grad(s, fast: bool):
        def total(m):
            return jnnx.penalized_loss(m, x, y, penalty_weight=3.0, layers=["input", "act", "c1"],
                                       capture_modules={"c1": "conv1"}, fast_convolutions=fast)[0]

        return nnx.value_and_grad(total)(nnx.merge(graphdef, s))

    values = fast_jit(lambda s: {fast: value_and_grad(s, fast) for fast in (True, False)})(state)
    jaxprs = {fast: str(jax.make_jaxpr(lambda s, fast=fast: value_and_grad(s, fast))(state))
              for fast in (True, False)}
    return values, jaxprs


def test_nnx_penalised_training_gradient_equals_flaxs_and_runs_the_fast_path():
    model = nnx_like(lambda rngs: _SmallNet(rngs=rngs), dtype=np.float64)
    x, y = normal((2, 11, 11, 2), 2), jnp.array([0, 2])
    graphdef, before = nnx.graphdef(model), jax.tree.map(np.asarray, nnx.state(model))
    values, jaxprs = _penalised_grads(model, x, y)
    (fast_total, fast), (plain_total, plain) = values[True], values[False]
    assert jax.default_backend() == "cpu"
    assert "lhs_dilation=(2, 2)" in jaxprs[False]  # flax's strided convolution, differentiated by XLA
    assert "lhs_dilation=(2, 2)" not in jaxprs[True] and fast_path(jaxprs[True])
    np.testing.assert_allclose(fast_total, plain_total, rtol=RTOL64, atol=ATOL64)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL64, atol=ATOL64), fast, plain)
    # The user's model is as it was: same classes, same graph, same values.
    assert nnx.graphdef(model) == graphdef and type(model.conv1) is nnx.Conv
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)


@pytest.mark.skipif(not onednn_conv.available(), reason="oneDNN's convolutions are not built here")
def test_float32_nnx_conv_runs_onednn_and_agrees_with_flax():
    conv = nnx_like(lambda rngs: nnx.Conv(3, 8, (3, 3), strides=2, padding="SAME", rngs=rngs),
                    dtype=np.float32)
    x = normal((2, 20, 20, 3), 3, dtype=np.float32)

    @fast_jit  # both in one program (eagerly, each primitive compiled on its own)
    def both(a):
        expected = conv(a)
        with jnnx.fast_convolutions(conv, True):  # impl="auto": oneDNN where it is built
            return expected, conv(a)

    expected, actual = both(x)
    with jnnx.fast_convolutions(conv, True):
        jaxpr = str(jax.make_jaxpr(lambda a: conv(a))(x))
    assert "agp_onednn_conv_forward" in jaxpr
    # float32 rounding of a 27-term sum of O(1) terms: ~1e-6 relative.
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
