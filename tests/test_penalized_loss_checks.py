"""``penalized_loss`` refuses the same inputs in JAX and PyTorch, and checks no traced weight.

The Python API's own checks (issue 10): an empty batch, a penalty weight that is NaN, negative or
not a scalar, and NaN inputs are a ``ValueError`` with the same message in both frameworks; under
``jax.jit`` a traced weight is not checked (and the step compiles once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_ref
from jax_impl import Net, penalized_loss
from tests._model_fixtures import params_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def jax_call(x, w):
    model = Net(num_classes=10)
    params = params_like(model, jnp.zeros((1, 16, 16, 1)), dtype=np.float32)  # no init run
    return penalized_loss(params, model, jnp.asarray(x), jnp.zeros(len(x), jnp.int32), penalty_weight=w)


def torch_call(x, w):
    model = torch_ref.Net(in_channels=1, num_classes=10, image_size=16)
    w = torch.as_tensor(w) if isinstance(w, np.ndarray) else w
    return torch_ref.penalized_loss(model, torch.as_tensor(x.transpose(0, 3, 1, 2).copy()),
                                    torch.zeros(len(x), dtype=torch.long), w)


GOOD_X = np.zeros((2, 16, 16, 1), np.float32)


@pytest.mark.parametrize("call", [jax_call, torch_call], ids=["jax", "torch"])
@pytest.mark.parametrize(("x", "weight", "message"), [
    (np.zeros((0, 16, 16, 1), np.float32), 1.0, "holds no examples"),
    (GOOD_X, float("nan"), "penalty_weight must be a finite number >= 0, got nan"),
    (GOOD_X, -1.0, "penalty_weight must be a finite number >= 0, got -1.0"),
    (GOOD_X, np.ones(3, np.float32), "penalty_weight must be one number (a scalar)"),
    (np.full((2, 16, 16, 1), np.nan, np.float32), 1.0, "contains NaN or Inf"),
], ids=["batch of 0", "NaN weight", "negative weight", "vector weight", "NaN input"])
def test_penalized_loss_refuses_the_same_inputs_in_both_frameworks(call, x, weight, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(x, weight)


def test_a_traced_penalty_weight_is_not_checked_under_jit():
    model = Net(num_classes=10)
    params = params_like(model, jnp.zeros((1, 16, 16, 1)), dtype=np.float32)  # no init run
    traces = []

    @jax.jit
    def loss(w):
        traces.append(w)
        x, y = jnp.asarray(GOOD_X), jnp.zeros(2, jnp.int32)
        return penalized_loss(params, model, x, y, penalty_weight=w)[0]

    assert np.isfinite(loss(2.0)) and np.isfinite(loss(3.0))  # a traced weight: no concrete check, no error
    assert len(traces) == 1  # compiled once: the checks cost nothing at run time
