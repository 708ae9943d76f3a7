"""The Flax model's contract: names, shapes, capture points, and penalized_loss basics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jax_impl import CAPTURE_NAMES, Net, penalized_loss
from parity_tests.harness import fast_jit
from tests._model_fixtures import params_like

# conv1 5*5*3*32+32, conv2 5*5*32*64+64, linear 1600*10+10: the seed's model.
NET_PARAMS = 2_432 + 51_264 + 16_010


@pytest.fixture(scope="module")
def params():
    """Float32 parameters of the seed's Net (32x32x3) at PyTorch's scale (``params_like``: no init run)."""
    return params_like(Net(), jnp.zeros((2, 32, 32, 3)), dtype=np.float32)


def test_parameter_tree_mirrors_reference_names_and_count():
    # The tree init builds (traced only: the shapes are the contract, not the random values).
    tree = jax.eval_shape(Net().init, jax.random.key(0), jnp.zeros((2, 32, 32, 3)))["params"]
    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(tree, sep=".").items()}
    assert shapes == {
        "conv1.kernel": (5, 5, 3, 32), "conv1.bias": (32,),
        "conv2.kernel": (5, 5, 32, 64), "conv2.bias": (64,),
        "linear.kernel": (1600, 10), "linear.bias": (10,),
    }
    assert sum(int(np.prod(s)) for s in shapes.values()) == NET_PARAMS


def test_capture_points_are_sown_with_their_shapes(params):
    x = jnp.ones((3, 32, 32, 3))
    # Shapes only: traced, not computed.
    logits, state = jax.eval_shape(lambda p: Net().apply({"params": p}, x, mutable=["intermediates"]), params)
    assert logits.shape == (3, 10)
    sown = {k: v[0].shape for k, v in state["intermediates"].items()}
    assert sown == {"relu1": (3, 14, 14, 32), "relu2": (3, 5, 5, 64)}
    assert tuple(sown) == CAPTURE_NAMES


def test_penalized_loss_works_at_a_batch_size_other_than_init_under_jit(params):
    x = jax.random.uniform(jax.random.key(1), (5, 32, 32, 3))
    y = jnp.arange(5) % 10

    @fast_jit
    def step(p):
        return jax.value_and_grad(
            lambda p: penalized_loss(p, Net(), x, y, penalty_weight=10.0), has_aux=True)(p)

    (total, aux), grads = step(params)
    assert aux["activation_grads"]["relu1"].shape == (5, 14, 14, 32)
    assert aux["activation_grads"]["relu2"].shape == (5, 5, 5, 64)
    assert total.shape == () and np.isfinite(total)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_unknown_layer_name_lists_the_valid_ones(params):
    x, y = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match=r"unknown penalty layer.*relu3.*\['relu1', 'relu2'\]"):
        penalized_loss(params, Net(), x, y, penalty_weight=1.0, layers=["relu3"])


def test_pytorch_default_init_draws_the_numbers_of_a_direct_uniform_draw():
    # The initializer draws flat and reshapes (faster to compile); the values must be those of
    # jax.random.uniform over the shape itself, so that seeds keep their meaning.
    from jax_impl.layers import torch_default_uniform

    key = jax.random.key(7)
    for shape, fan_in in (((5, 5, 32, 64), 800), ((1600, 10), 1600), ((64,), 800)):
        bound = 1 / np.sqrt(fan_in)
        direct = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        np.testing.assert_array_equal(torch_default_uniform(fan_in)(key, shape), direct)
