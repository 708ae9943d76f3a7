"""Properties of the penalty that hold for every input, checked with hypothesis.

The penalty is checked against an independent computation: the seed's network
written out with plain ``jax.lax`` and ``jnp`` operations (XLA's own
convolution, a reshape-and-max pool, a hand-written cross-entropy) and *cut* at
each capture point, so that ``d loss / d a_l`` is the ordinary gradient of the
network's tail with respect to its input, without ``jax_impl``'s perturbations.

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


def conv_valid(x, layer):
    """XLA's convolution, VALID, stride 1: (B, H, W, Ci) * (5, 5, Ci, Co) -> (B, H-4, W-4, Co)."""
    y = jax.lax.conv_general_dilated(x, layer["kernel"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + layer["bias"]


def pool_relu(x):
    """2x2 max pool, then relu: (B, H, W, C) -> (B, H/2, W/2, C) (no ties in random float64 data)."""
    b, h, w, c = x.shape
    return jax.nn.relu(x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4)))


def mean_cross_entropy(logits, y):
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])


def cut_network(params, x, y):
    """The seed's Net cut at its capture points: ``(acts, tails)``.

    ``acts[l]`` is the activation at capture point ``l``; ``tails[l](a)`` is the
    mean cross-entropy of the rest of the network applied to ``a``.
    """
    relu1 = pool_relu(conv_valid(x, params["conv1"]))  # (B, 14, 14, 32)
    relu2 = pool_relu(conv_valid(relu1, params["conv2"]))  # (B, 5, 5, 64)

    def from_relu2(a):
        logits = a.reshape(a.shape[0], -1) @ params["linear"]["kernel"] + params["linear"]["bias"]  # (B, 10)
        return mean_cross_entropy(logits, y)

    def from_relu1(a):
        return from_relu2(pool_relu(conv_valid(a, params["conv2"])))

    return {"relu1": relu1, "relu2": relu2}, {"relu1": from_relu1, "relu2": from_relu2}


def cut_loss_and_terms(params, x, y):
    """The loss and, per capture point, ``||d loss / d a_l||^2`` on the cut network."""
    acts, tails = cut_network(params, x, y)
    terms = {name: jnp.sum(jax.grad(tails[name])(acts[name]) ** 2) for name in CAPTURE_NAMES}
    return tails["relu2"](acts["relu2"]), terms


cut_loss_and_terms_jit = jax.jit(cut_loss_and_terms)


@jax.jit
def cut_training_grad(params, x, y, weight):
    """d/d params of ``loss + weight * sum_l ||d loss / d a_l||^2``, through the cut network."""

    def objective(p):
        loss, terms = cut_loss_and_terms(p, x, y)
        return loss + weight * sum(terms.values())

    return jax.grad(objective)(params)


def assert_trees_close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=RTOL, atol=ATOL)


# (data seed, batch size). Few distinct batch sizes: each one costs a compile.
batches = st.tuples(st.integers(0, 2**16), st.sampled_from([1, 3]))
weights = st.floats(0.0, 100.0, allow_nan=False)


@PROPERTY_SETTINGS
@given(batches, weights)
def test_each_term_is_the_squared_loss_gradient_at_that_activation_of_the_cut_network(batch, w):
    x, y = make_batch(*batch)
    params = init_params(2)
    total, aux = total_and_aux(params, x, y, w)
    loss, terms = cut_loss_and_terms_jit(params, x, y)
    assert set(aux["penalty_terms"]) == set(CAPTURE_NAMES)
    for name in CAPTURE_NAMES:
        np.testing.assert_allclose(aux["penalty_terms"][name], terms[name], rtol=RTOL, atol=ATOL,
                                   err_msg=name)
    penalty = sum(terms.values())  # the seed answer's sum over layers
    np.testing.assert_allclose(aux["loss"], loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(aux["penalty"], penalty, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(total, loss + w * penalty, rtol=RTOL, atol=ATOL)


@PROPERTY_SETTINGS
@given(batches, weights)
def test_training_gradient_is_that_of_the_penalised_cut_network(batch, w):
    """Double backprop: the parameter gradient of ``loss + w * penalty``, both taken on the cut network."""
    x, y = make_batch(*batch)
    params = init_params(2)
    assert_trees_close(training_grad(params, x, y, w), cut_training_grad(params, x, y, w))


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
