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
measured fastest on the backend at hand (``jax_impl.xla_options``); on CPU,
``keep_host_memory()`` once at start keeps XLA's temporaries from being
unmapped and faulted in again at every call (``agp_common.host_memory``).

This package never imports PyTorch.
"""

from agp_common.lazy import lazy_exports

#: Public name -> the module that defines it; imported on first use (``agp_common.lazy``), so that
#: ``import jax_impl`` is instant and JAX/PyTorch load when the first name is used.
_EXPORTS = {
    "Attack": "agp_common.attack_spec",
    "PenaltyOptions": "agp_common.penalty_spec",
    "adversarial_correct": "jax_impl.attacks",
    "adversarial_examples": "jax_impl.attacks",
    "fgsm": "jax_impl.attacks",
    "input_gradient": "jax_impl.attacks",
    "pgd": "jax_impl.attacks",
    "ConvImpl": "jax_impl.conv_impl",
    "fast_convolutions": "jax_impl.fast_conv",
    "linen_forward": "jax_impl.forward",
    "zero_perturbations": "jax_impl.forward",
    "Conv2D": "jax_impl.layers",
    "Dense": "jax_impl.layers",
    "capture": "jax_impl.layers",
    "max_pool_2x2": "jax_impl.layers",
    "cross_entropy_loss": "jax_impl.losses",
    "CAPTURE_NAMES": "jax_impl.model",
    "Net": "jax_impl.model",
    "capture_points": "jax_impl.module_capture",
    "INPUT": "jax_impl.penalty",
    "is_penalty_step": "jax_impl.penalty",
    "lazy_penalty_weight": "jax_impl.penalty",
    "lazy_value_and_grad": "jax_impl.penalty",
    "penalized_loss": "jax_impl.penalty",
    "penalized_loss_from_forward": "jax_impl.penalty",
    "jit_options": "jax_impl.xla_options",
    "keep_host_memory": "agp_common.host_memory",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
    "keep_host_memory",
    "lazy_penalty_weight",
    "lazy_value_and_grad",
    "linen_forward",
    "max_pool_2x2",
    "penalized_loss",
    "penalized_loss_from_forward",
    "pgd",
    "zero_perturbations",
]
