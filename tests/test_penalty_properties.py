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

from jax_impl import CAPTURE_NAMES, Net, penalized_loss
from parity_tests.harness import fast_jit
from tests._model_fixtures import params_like

# Summation order differs between the compared expressions; float64 rounding
# on values of order 1 stays far below this.
RTOL = 1e-9
ATOL = 1e-12

MODEL = Net()
#: (H, W, C) of the images: Net's smallest input (relu1 (6, 6, 32), relu2 (1, 1, 64)), two channels so
#: that conv1 sums over channels. The properties do not depend on the size; the seed's 32x32x3 would
#: cost ~5x more time per example with the fast-compiling options of ``fast_jit``.
IMAGE = (16, 16, 2)
PROPERTY_SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)


@pytest.fixture(scope="module", autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@functools.cache
def params():
    """Float64 parameters of Net for ``IMAGE`` (PyTorch's scale, from NumPy: ``params_like``)."""
    return params_like(MODEL, np.zeros((1, *IMAGE)))


@fast_jit
def _init_float64(seed, x):
    """``MODEL.init(key(seed), x)["params"]`` cast to float64: key, init and casts in one program per
    shape of ``x`` (made eagerly, the key and each parameter's cast compile programs of their own).

    The key is an "rbg" one: threefry compiles ~2.5 s per parameter shape here; how ``init`` splits
    and uses its key does not depend on the key's implementation.
    """
    variables = MODEL.init(jax.random.key(seed, impl="rbg"), x)
    return jax.tree.map(lambda p: p.astype(jnp.float64), variables["params"])


@functools.cache
def init_params(init_batch: int, seed: int = 0):
    """``MODEL.init`` at a batch of ``init_batch`` images (compiled), cast to float64."""
    return _init_float64(seed, np.zeros((init_batch, *IMAGE)))


def make_batch(seed: int, batch: int):
    """``(x, y)`` as NumPy arrays (float64, int64): the compiled functions take them as they are,
    and permuting them is not an eager JAX op (which compiles per batch size)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, *IMAGE)), rng.integers(0, 10, batch)


@fast_jit
def penalised(params, x, y, weight):
    """``((total, aux), d total / d params)`` of ``penalized_loss`` on ``MODEL`` (compiled per batch size)."""
    return jax.value_and_grad(lambda p: penalized_loss(p, MODEL, x, y, penalty_weight=weight),
                              has_aux=True)(params)


def total_and_aux(params, x, y, weight):
    return penalised(params, x, y, weight)[0]


def training_grad(params, x, y, weight):
    return penalised(params, x, y, weight)[1]


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


@fast_jit
def cut_reference(params, x, y, weight):
    """Everything on the cut network, in one compile per batch size: ``(loss, terms)``, the parameter
    gradient of ``loss + weight * sum_l terms[l]``, and that of the plain loss."""

    def objective(p):
        loss, terms = cut_loss_and_terms(p, x, y)
        return loss + weight * sum(terms.values()), (loss, terms)

    (_, (loss, terms)), grad = jax.value_and_grad(objective, has_aux=True)(params)
    plain = jax.grad(lambda p: cut_loss_and_terms(p, x, y)[0])(params)
    return (loss, terms), grad, plain


def cut_loss_and_terms_of(params, x, y):
    """``(loss, terms)`` of the cut network as NumPy values (the tests sum and scale them eagerly)."""
    return jax.tree.map(np.asarray, cut_reference(params, x, y, 0.0)[0])


def cut_training_grad(params, x, y, weight):
    """d/d params of ``loss + weight * sum_l ||d loss / d a_l||^2``, through the cut network."""
    return cut_reference(params, x, y, weight)[1]


def plain_loss_grad(params, x, y):
    """d loss / d params of the cut network: the gradient without any penalty machinery."""
    return cut_reference(params, x, y, 0.0)[2]


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
    total, aux = total_and_aux(params(), x, y, w)
    loss, terms = cut_loss_and_terms_of(params(), x, y)
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
    assert_trees_close(training_grad(params(), x, y, w), cut_training_grad(params(), x, y, w))


@PROPERTY_SETTINGS
@given(batches)
def test_zero_weight_training_gradient_is_the_plain_loss_gradient(batch):
    x, y = make_batch(*batch)
    assert_trees_close(training_grad(params(), x, y, 0.0), plain_loss_grad(params(), x, y))


@PROPERTY_SETTINGS
@given(batches, st.randoms(use_true_random=False))
def test_penalty_is_invariant_to_permuting_the_batch(batch, rnd):
    x, y = make_batch(*batch)
    order = list(range(x.shape[0]))
    rnd.shuffle(order)
    (total, aux), grad = penalised(params(), x, y, 10.0)
    (total_p, aux_p), grad_p = penalised(params(), x[order], y[order], 10.0)
    np.testing.assert_allclose(total_p, total, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(aux_p["penalty"], aux["penalty"], rtol=RTOL, atol=ATOL)
    assert_trees_close(grad_p, grad)


@pytest.mark.parametrize("init_batch", [1, 5])
def test_value_does_not_depend_on_the_init_batch_size(init_batch):
    # Same seed, different init batch: parameters are identical, and so must be
    # everything computed from them at the apply batch.
    x, y = make_batch(0, 3)
    assert_trees_close(init_params(init_batch), init_params(2))
    total, _ = total_and_aux(init_params(init_batch), x, y, 10.0)
    total_ref, _ = total_and_aux(init_params(2), x, y, 10.0)
    np.testing.assert_allclose(total, total_ref, rtol=RTOL, atol=ATOL)
