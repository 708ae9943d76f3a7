"""JAX/Flax port of the activation gradient penalty recipe.

Public API::

    from jax_impl import Net, penalized_loss

    model = Net()
    params = model.init(jax.random.key(0), x)["params"]
    (total, aux), grads = jax.value_and_grad(penalized_loss, has_aux=True)(
        params, model, x, y, penalty_weight=10.0)

A model without ``capture()`` marks (a Hugging Face Flax model, a zoo ResNet)
names its capture points by module path instead; ``capture_points(model, x)``
lists them with their shapes::

    penalized_loss(params, model, x, y, penalty_weight=10.0,
                   capture_modules={"layer0": "bert/encoder/layer/0"})

``jax.jit(step, **jit_options())`` compiles ``step`` with the XLA options that
measured fastest on the backend at hand (``jax_impl.xla_options``).

This package never imports PyTorch.
"""

from agp_common.attack_spec import Attack
from agp_common.penalty_spec import PenaltyOptions
from jax_impl.attacks import adversarial_correct, adversarial_examples, fgsm, input_gradient, pgd
from jax_impl.conv_impl import ConvImpl
from jax_impl.fast_conv import fast_convolutions
from jax_impl.layers import Conv2D, Dense, capture, max_pool_2x2
from jax_impl.model import CAPTURE_NAMES, Net
from jax_impl.module_capture import capture_points
from jax_impl.penalty import (
    INPUT,
    cross_entropy_loss,
    is_penalty_step,
    lazy_penalty_weight,
    lazy_value_and_grad,
    linen_forward,
    penalized_loss,
    penalized_loss_from_forward,
    zero_perturbations,
)
from jax_impl.xla_options import jit_options

__all__ = [
    "CAPTURE_NAMES",
    "INPUT",
    "Attack",
    "Conv2D",
    "ConvImpl",
    "Dense",
    "Net",
    "PenaltyOptions",
    "adversarial_correct",
    "adversarial_examples",
    "capture",
    "capture_points",
    "cross_entropy_loss",
    "fast_convolutions",
    "fgsm",
    "input_gradient",
    "is_penalty_step",
    "jit_options",
    "lazy_penalty_weight",
    "lazy_value_and_grad",
    "linen_forward",
    "max_pool_2x2",
    "penalized_loss",
    "penalized_loss_from_forward",
    "pgd",
    "zero_perturbations",
]
