"""Properties of the penalty that hold for every input, checked with hypothesis.

Float64 throughout so that equalities that hold mathematically hold to ~1e-12
(the only error is rounding in different summation orders).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_impl import CAPTURE_NAMES, Net, cross_entropy_loss, penalized_loss

# Summation order differs between the compared expressions; float64 rounding
# on values of order 1 stays far below this.
RTOL = 1e-9
ATOL = 1e-12

MODEL = Net()
PROPERTY_SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)


@pytest.fixture(scope="module", autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@functools.cache
def init_params(init_batch: int, seed: int = 0):
    x = jnp.zeros((init_batch, 32, 32, 3), jnp.float64)
    params = MODEL.init(jax.random.key(seed), x)["params"]
    return jax.tree.map(lambda p: p.astype(jnp.float64), params)


def make_batch(seed: int, batch: int):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)))
    y = jnp.asarray(rng.integers(0, 10, batch))
    return x, y


@jax.jit
def total_and_aux(params, x, y, weight):
    return penalized_loss(params, MODEL, x, y, penalty_weight=weight)


@jax.jit
def training_grad(params, x, y, weight):
    return jax.grad(lambda p: penalized_loss(p, MODEL, x, y, penalty_weight=weight)[0])(params)


@jax.jit
def plain_loss_grad(params, x, y):
    return jax.grad(lambda p: cross_entropy_loss(MODEL.apply({"params": p}, x), y))(params)


def assert_trees_close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=RTOL, atol=ATOL)


# (data seed, batch size). Few distinct batch sizes: each one costs a compile.
batches = st.tuples(st.integers(0, 2**16), st.sampled_from([1, 3]))
weights = st.floats(0.0, 100.0, allow_nan=False)


@PROPERTY_SETTINGS
@given(batches)
def test_penalty_and_each_term_are_nonnegative(batch):
    _, aux = total_and_aux(init_params(2), *make_batch(*batch), 10.0)
    assert float(aux["penalty"]) >= 0.0
    assert all(float(t) >= 0.0 for t in aux["penalty_terms"].values())


@PROPERTY_SETTINGS
@given(batches)
def test_layer_terms_add_up_to_the_penalty(batch):
    _, aux = total_and_aux(init_params(2), *make_batch(*batch), 10.0)
    assert set(aux["penalty_terms"]) == set(CAPTURE_NAMES)
    np.testing.assert_allclose(sum(aux["penalty_terms"].values()), aux["penalty"], rtol=RTOL, atol=ATOL)


@PROPERTY_SETTINGS
@given(batches, weights, weights)
def test_total_is_linear_in_the_weight(batch, w1, w2):
    x, y = make_batch(*batch)
    params = init_params(2)
    t1, aux = total_and_aux(params, x, y, w1)
    t2, _ = total_and_aux(params, x, y, w2)
    # total(w) = loss + w * penalty, so the slope between any two weights is the penalty.
    np.testing.assert_allclose(t1, aux["loss"] + w1 * aux["penalty"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(t2 - t1, (w2 - w1) * aux["penalty"], rtol=1e-7, atol=1e-10)


@PROPERTY_SETTINGS
@given(batches)
def test_zero_weight_training_gradient_is_the_plain_loss_gradient(batch):
    x, y = make_batch(*batch)
    params = init_params(2)
    assert_trees_close(training_grad(params, x, y, 0.0), plain_loss_grad(params, x, y))


@PROPERTY_SETTINGS
@given(batches, st.randoms(use_true_random=False))
def test_penalty_is_invariant_to_permuting_the_batch(batch, rnd):
    x, y = make_batch(*batch)
    order = list(range(x.shape[0]))
    rnd.shuffle(order)
    params = init_params(2)
    total, aux = total_and_aux(params, x, y, 10.0)
    total_p, aux_p = total_and_aux(params, x[jnp.asarray(order)], y[jnp.asarray(order)], 10.0)
    np.testing.assert_allclose(total_p, total, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(aux_p["penalty"], aux["penalty"], rtol=RTOL, atol=ATOL)
    assert_trees_close(training_grad(params, x[jnp.asarray(order)], y[jnp.asarray(order)], 10.0),
                       training_grad(params, x, y, 10.0))


@PROPERTY_SETTINGS
@given(batches, st.integers(1, 5))
def test_value_does_not_depend_on_the_init_batch_size(batch, init_batch):
    # Same seed, different init batch: parameters are identical, and so must be
    # everything computed from them at the apply batch.
    x, y = make_batch(*batch)
    assert_trees_close(init_params(init_batch), init_params(2))
    total, _ = total_and_aux(init_params(init_batch), x, y, 10.0)
    total_ref, _ = total_and_aux(init_params(2), x, y, 10.0)
    np.testing.assert_allclose(total, total_ref, rtol=RTOL, atol=ATOL)
