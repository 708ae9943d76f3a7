"""The JAX CLI's networks: the built-in ``--model`` names as Flax modules, and how to call a model.

``jax_registry(num_classes)`` is the registry ``agp_app.model_spec.build_model`` takes::

    cnn       jax_impl.Net(num_classes, **args)
    resnet18  jax_impl.resnet.ResNet18(num_classes, **args)     (args: width, blocks)

How the train step calls a model (``agp_app.model_spec``'s docstring): ``apply_kwargs(model,
train=...)`` is ``{"train": train}`` when the module's ``__call__`` has a ``train`` parameter
(``ResNet18``), else ``{}`` (``Net``); ``mutable_collections(variables, train=...)`` is
``("batch_stats",)`` in training when ``init`` created batch statistics, else ``()``. With
``jax_impl.linen_forward(model, params, model_state={"batch_stats": ...},
mutable=mutable_collections(...), apply_kwargs=apply_kwargs(...))`` the forward returns the
updated statistics next to the outputs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from agp_app.model_spec import ModelSpec, build_model
from jax_impl.model import Net
from jax_impl.module_capture import probe, runner
from jax_impl.resnet import ResNet18

#: Name of the collection that holds BatchNorm's running statistics.
BATCH_STATS = "batch_stats"


def jax_registry(num_classes: int) -> dict[str, Callable[..., nn.Module]]:
    """Built-in ``--model`` names -> constructors taking ``--model-args`` as keywords."""
    return {"cnn": functools.partial(Net, num_classes=num_classes),
            "resnet18": functools.partial(ResNet18, num_classes=num_classes)}


def takes_train(model: nn.Module) -> bool:
    """Whether ``model.__call__`` has a parameter named ``train`` (Flax's convention for BatchNorm)."""
    return "train" in inspect.signature(type(model).__call__).parameters


def apply_kwargs(model: nn.Module, *, train: bool) -> dict[str, bool]:
    """``{"train": train}`` for a model whose ``__call__`` takes ``train``, else ``{}``."""
    return {"train": train} if takes_train(model) else {}


def mutable_collections(variables: Mapping[str, Any], *, train: bool) -> tuple[str, ...]:
    """``("batch_stats",)`` when training a model whose variables hold batch statistics, else ``()``."""
    return (BATCH_STATS,) if train and BATCH_STATS in variables else ()


def build_jax_model(spec: ModelSpec, num_classes: int, conv_impl: str = "auto") -> nn.Module:
    """The Flax module ``spec`` names (``build_model`` with ``jax_registry``); ``cnn`` uses ``conv_impl``
    (``--conv-impl``); a user's class or factory also gets ``num_classes`` if its signature names it."""
    registry = jax_registry(num_classes)
    registry["cnn"] = functools.partial(Net, num_classes=num_classes, conv_impl=conv_impl)
    return build_model(spec, registry, nn.Module, "Flax", data_kwargs={"num_classes": num_classes})


def capture_names(model: nn.Module, image_shape: tuple[int, ...],
                  capture_modules: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The model's ``capture()`` points for images of ``image_shape`` (H, W, C), in call order.

    Traced only (``jax.eval_shape``: nothing is computed). ``capture_modules`` (``{name: path}``) are
    checked too: ``ValueError`` (one line, listing the nearest paths) for a path the model never calls.
    """
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    state = {k: v for k, v in variables.items() if k != "params"}
    found = probe(runner(model, apply_kwargs=apply_kwargs(model, train=False)), variables["params"], state, x,
                  capture_modules=capture_modules)
    return tuple(name for name in found.capture_shapes if name not in (capture_modules or {}))
