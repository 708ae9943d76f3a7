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
from jax_impl.models_zoo import MLP, MLP_CAPTURE_NAMES, RESNET_CAPTURE_NAMES, ResNet
from jax_impl.penalty import (
    INPUT,
    cross_entropy_loss,
    is_penalty_step,
    lazy_penalty_weight,
    lazy_value_and_grad,
    loss_and_activation_grads,
    penalized_loss,
    penalized_loss_from_forward,
    zero_perturbations,
)

__all__ = [
    "CAPTURE_NAMES",
    "INPUT",
    "MLP",
    "MLP_CAPTURE_NAMES",
    "RESNET_CAPTURE_NAMES",
    "Conv2D",
    "Dense",
    "Net",
    "ResNet",
    "capture",
    "cross_entropy_loss",
    "is_penalty_step",
    "lazy_penalty_weight",
    "lazy_value_and_grad",
    "loss_and_activation_grads",
    "max_pool_2x2",
    "penalized_loss",
    "penalized_loss_from_forward",
    "zero_perturbations",
]
