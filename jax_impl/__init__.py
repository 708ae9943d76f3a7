"""JAX/Flax port of the activation gradient penalty recipe.

Public API::

    from jax_impl import Net, penalized_loss

    model = Net()
    params = model.init(jax.random.key(0), x)["params"]
    (total, aux), grads = jax.value_and_grad(penalized_loss, has_aux=True)(
        params, model, x, y, penalty_weight=10.0)

This package never imports PyTorch.
"""

from jax_impl.layers import Conv2D, Dense, capture, max_pool_2x2
from jax_impl.model import CAPTURE_NAMES, Net
from jax_impl.penalty import (
    cross_entropy_loss,
    loss_and_activation_grads,
    penalized_loss,
    zero_perturbations,
)

__all__ = [
    "CAPTURE_NAMES",
    "Conv2D",
    "Dense",
    "Net",
    "capture",
    "cross_entropy_loss",
    "loss_and_activation_grads",
    "max_pool_2x2",
    "penalized_loss",
    "zero_perturbations",
]
