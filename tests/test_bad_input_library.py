"""Library input checks: Net and penalized_loss (JAX and PyTorch) raise a ValueError naming the expected
shape.

Shape/dtype checks are static, so they also fire under ``jax.jit`` (at trace
time); value checks (label range, NaN) run only on concrete arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from agp_common import ModelInputError
from jax_impl import Net, penalized_loss
from tests._model_fixtures import params_like
from torch_ref import Net as TorchNet
from torch_ref import penalized_loss as torch_penalized_loss

MODEL = Net()
# Float32 parameters of the seed's Net; init's values are not needed (params_like: no init run).
PARAMS = params_like(MODEL, jnp.zeros((1, 32, 32, 3)), dtype=np.float32)
X = jnp.zeros((2, 32, 32, 3))
Y = jnp.array([1, 2])


@pytest.mark.parametrize(("x", "message"), [
    (jnp.zeros((32, 32, 3)), r"expected NHWC images of shape \(B, 32, 32, 3\), got shape \(32, 32, 3\)"),
    (jnp.zeros((2, 32, 32, 1)), r"expected images of shape \(B, 32, 32, 3\) \(3 channels.*\(1 channels\)"),
    (jnp.zeros((2, 28, 28, 3)), r"expected images of shape \(B, 32, 32, 3\).*got shape \(2, 28, 28, 3\)"),
    (jnp.zeros((2, 8, 8, 3)), r"at least 16x16"),
    (jnp.zeros((2, 32, 32, 3), jnp.int32), r"expected floating-point images.*got dtype int32"),
])
@pytest.mark.parametrize("jit", [False, True])
def test_net_names_the_expected_input_shape(x, message, jit):
    apply = jax.jit(MODEL.apply) if jit else MODEL.apply
    with pytest.raises(ValueError, match=message):
        apply({"params": PARAMS}, x)


@pytest.mark.parametrize(("y", "message"), [
    (Y.astype(jnp.float32), r"integer class labels y of shape \(2,\) in \[0, 10\), got dtype float32"),
    (Y[:1], r"expected labels y of shape \(2,\).*got shape \(1,\)"),
    (Y[:, None], r"expected labels y of shape \(2,\).*got shape \(2, 1\)"),
])
@pytest.mark.parametrize("jit", [False, True])
def test_penalized_loss_checks_label_shape_and_dtype_even_under_jit(y, message, jit):
    def f(y):
        return penalized_loss(PARAMS, MODEL, X, y, penalty_weight=1.0)[0]

    with pytest.raises(ModelInputError, match=message):
        (jax.jit(f) if jit else f)(y)


def test_label_range_and_nan_are_checked_on_concrete_values_only():
    with pytest.raises(ModelInputError, match=r"class indices in \[0, 10\), found values from 1 to 10"):
        penalized_loss(PARAMS, MODEL, X, jnp.array([1, 10]), penalty_weight=1.0)
    with pytest.raises(ModelInputError, match="from -1 to 1"):  # under grad w.r.t. params, y is concrete
        jax.grad(lambda p: penalized_loss(p, MODEL, X, jnp.array([1, -1]), penalty_weight=1.0)[0])(PARAMS)
    with pytest.raises(ModelInputError, match="x contains NaN or Inf"):
        penalized_loss(PARAMS, MODEL, X.at[0, 0, 0, 0].set(jnp.nan), Y, penalty_weight=1.0)
    # Under jit the values are tracers: no check, no error (the CLIs validate data when loading it);
    # XLA then gives NaN for the out-of-range label, which the training loop reports by step.
    total = jax.jit(lambda y: penalized_loss(PARAMS, MODEL, X, y, penalty_weight=1.0)[0])(jnp.array([1, 10]))
    assert total.shape == ()


def test_example_weights_must_have_one_weight_per_example():
    with pytest.raises(ModelInputError, match=r"expected example_weights of shape \(2,\)"):
        penalized_loss(PARAMS, MODEL, X, Y, penalty_weight=1.0, example_weights=jnp.ones(3))


TORCH_NET = TorchNet()


@pytest.mark.parametrize(("x", "message"), [
    (torch.zeros(3, 32, 32), r"expected NCHW images of shape \(B, 3, 32, 32\), got shape \(3, 32, 32\)"),
    (torch.zeros(2, 1, 32, 32), r"\(3 channels\), got shape \(2, 1, 32, 32\)"),
    (torch.zeros(2, 3, 28, 28), r"expected images of shape \(B, 3, 32, 32\).*got shape \(2, 3, 28, 28\)"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.int64), r"expected floating-point images.*torch.int64"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.float64), r"expected images of dtype torch.float32"),
])
def test_torch_net_names_the_expected_input_shape(x, message):
    with pytest.raises(ValueError, match=message):
        TORCH_NET(x)


@pytest.mark.parametrize(("y", "message"), [
    (torch.tensor([1.0, 2.0]), r"expected integer class labels of shape \(2,\) in \[0, 10\), got dtype"),
    (torch.tensor([1]), r"expected labels of shape \(2,\).*got shape \(1,\)"),
    (torch.tensor([1, 10]), r"labels must be class indices in \[0, 10\), found values from 1 to 10"),
    (torch.tensor([-1, 0]), r"found values from -1 to 0"),
])
def test_torch_penalized_loss_checks_the_labels(y, message):
    with pytest.raises(ModelInputError, match=message):
        torch_penalized_loss(TORCH_NET, torch.zeros(2, 3, 32, 32), y, 1.0)
