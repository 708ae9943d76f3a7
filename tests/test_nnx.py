"""The penalty on Flax NNX modules: the seed CNN in NNX gives the Linen numbers on the same weights."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_impl import Net, penalized_loss
from jax_impl import nnx as jnnx
from parity_tests.harness import fast_jit
from tests._model_fixtures import nnx_like, params_like

# Same function, same weights; XLA convolution (NNX) vs the Linen Net's backend choice: float64 rounding.
RTOL = 1e-10
LAYERS = ("conv1", "conv2", "linear")


@pytest.fixture(scope="module", autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def twins():
    """A Linen ``Net`` params tree (float64) and a batch, at Net's smallest input, 16x16x1."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 16, 16, 1)))
    y = jnp.asarray(rng.integers(0, 10, 3))
    return params_like(Net(), x), x, y


def nnx_twin(params):
    """An NNX ``Net`` holding the same weights (its own initialisers never run: all are replaced)."""
    model = nnx_like(lambda rngs: jnnx.Net(in_channels=1, image_size=16, rngs=rngs))
    for layer in LAYERS:
        getattr(model, layer).kernel.set_value(params[layer]["kernel"])
        getattr(model, layer).bias.set_value(params[layer]["bias"])
    return model


@pytest.mark.parametrize("options", [
    {},
    {"normalization": "per_example", "norm": "l2", "layers": ["input", "relu2"]},
])
def test_nnx_net_gives_linen_numbers_and_gradients(twins, options):
    params, x, y = twins
    model = nnx_twin(params)
    (total_l, aux_l), grads_l = fast_jit(jax.value_and_grad(
        lambda p: penalized_loss(p, Net(), x, y, penalty_weight=10.0, **options), has_aux=True))(params)
    graphdef, state = nnx.split(model)

    @fast_jit
    def nnx_value_and_grad(state):  # nnx.jit, but with fast_jit's compile options
        return nnx.value_and_grad(
            lambda m: jnnx.penalized_loss(m, x, y, penalty_weight=10.0, **options), has_aux=True,
        )(nnx.merge(graphdef, state))

    (total_n, aux_n), grads_n = nnx_value_and_grad(state)
    np.testing.assert_allclose(total_n, total_l, rtol=RTOL)
    for name, term in aux_l["penalty_terms"].items():
        np.testing.assert_allclose(aux_n["penalty_terms"][name], term, rtol=RTOL)
        np.testing.assert_allclose(aux_n["activation_grads"][name], aux_l["activation_grads"][name],
                                   rtol=RTOL, atol=1e-16)
    for layer in LAYERS:
        for pname in ("kernel", "bias"):
            np.testing.assert_allclose(grads_n[layer][pname].get_value(), grads_l[layer][pname],
                                       rtol=RTOL, atol=1e-15)


def test_nnx_capture_is_a_no_op_outside_nnx_capture(twins):
    params, x, _ = twins
    model = nnx_twin(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # perturb/sow outside nnx.capture would warn (deprecated)
        logits = model(x)
    np.testing.assert_allclose(logits, fast_jit(Net().apply)({"params": params}, x), rtol=RTOL)
    assert not hasattr(model, "relu1")  # no perturbation variable created on the module


def test_nnx_zero_perturbations_follow_the_batch(twins):
    params, x, _ = twins
    shapes = {k: v.shape for k, v in jnnx.zero_perturbations(nnx_twin(params), x[:2]).items()}
    assert shapes == {"relu1": (2, 6, 6, 32), "relu2": (2, 1, 1, 64)}


class BNNet(nnx.Module):
    """Dense (capture) -> BatchNorm -> relu -> Dense: BatchStat state, and examples that interact
    downstream of the capture point (through the batch statistics)."""

    def __init__(self, *, rngs):
        self.dense = nnx.Linear(4, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = jnnx.capture(self, "dense", self.dense(x))
        return self.head(nnx.relu(self.bn(x)))


def test_nnx_batchnorm_stats_are_updated_and_per_example_uses_the_jacobian():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 4)), jnp.float32)
    y = jnp.array([0, 1, 2, 0, 1])
    model = nnx_like(lambda rngs: BNNet(rngs=rngs))
    before = np.asarray(model.bn.mean.get_value())
    # nnx.jit carries the model's state in and out: the write-back below is penalized_loss's own.
    per_example = nnx.jit(
        lambda m, **interact: jnnx.penalized_loss(m, x, y, penalty_weight=1.0, normalization="per_example",
                                                  **interact),
        static_argnames="examples_interact")
    _, aux = per_example(model)
    after = np.asarray(model.bn.mean.get_value())
    assert not np.allclose(before, after)  # the batch statistics were written back into the model
    _, ignored = per_example(model, examples_interact=False)
    assert not np.allclose(aux["penalty"], ignored["penalty"], rtol=1e-3)
