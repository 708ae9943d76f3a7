"""The activation gradient penalty for Flax NNX modules (Flax >= 0.12.6, ``nnx.capture``).

An NNX model marks a capture point with one line in ``__call__``::

    x = capture(self, "relu1", x)     # jax_impl.nnx.capture: self.perturb + self.sow

and ``penalized_loss(model, x, y, penalty_weight=...)`` gives the same numbers
as ``jax_impl.penalized_loss`` on the equivalent Linen model, with the same
options (it runs the same core, ``penalty.penalized_loss_from_forward``).
Differentiate it with ``nnx.grad`` / ``nnx.value_and_grad`` over the model::

    grads = nnx.grad(lambda m: penalized_loss(m, x, y, penalty_weight=10.0)[0])(model)

Under the hood the model is ``nnx.split`` into a graph and a state, and every
forward pass merges a fresh copy and runs it under
``nnx.capture(module, init=perturbations)``: ``Module.perturb`` then returns
``value + perturbation``, whose gradient is d loss / d a. ``BatchStat``
updates (BatchNorm in train mode) are written back into ``model``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.layers import max_pool_2x2
from jax_impl.penalty import SEP, penalized_loss_from_forward
from jax_impl.validation import check_loss_inputs

#: Capture points of ``Net``, in forward order (same as the Linen ``Net``).
CAPTURE_NAMES = ("relu1", "relu2")


def capture(module: nnx.Module, name: str, x: jax.Array) -> jax.Array:
    """Mark ``x`` as the capture point ``name`` of an NNX module and return it.

    Inside ``nnx.capture`` this is ``module.perturb(name, x)`` (``x`` plus a
    zero perturbation) followed by ``module.sow(nnx.Intermediate, name, x)``.
    Outside any ``nnx.capture`` context it returns ``x`` untouched: plain
    inference stays free of perturbation variables (``perturb``/``sow`` would
    otherwise create them as attributes and warn).
    """
    # nnx.capture marks a running capture by setting __captures__ on every module.
    if not hasattr(module, "__captures__"):
        return x
    x = module.perturb(name, x)
    module.sow(nnx.Intermediate, name, x)
    return x


class Net(nnx.Module):
    """The seed CNN in NNX: same layers, parameter names and capture points as ``jax_impl.Net``.

    conv5x5(C->32) -> maxpool2 -> relu (``relu1``) -> conv5x5(32->64) -> maxpool2
    -> relu (``relu2``) -> flatten (h, w, c) -> linear(->num_classes). Input
    NHWC (B, image_size, image_size, C). Initialisation is NNX's default
    (not PyTorch's); tests copy weights.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, *, rngs: nnx.Rngs):
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size must be at least 16 for two conv5x5+pool2 stages, got {image_size}")
        self.conv1 = nnx.Conv(in_channels, 32, (5, 5), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (5, 5), padding="VALID", rngs=rngs)
        self.linear = nnx.Linear(64 * side * side, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(max_pool_2x2(self.conv1(x)))  # (B, 14, 14, 32)
        x = capture(self, "relu1", x)
        x = nnx.relu(max_pool_2x2(self.conv2(x)))  # (B, 5, 5, 64)
        x = capture(self, "relu2", x)
        x = x.reshape(x.shape[0], -1)  # (B, 1600), (h, w, c) order
        return self.linear(x)  # (B, 10)


def _perturbation_template(graphdef, state, x: jax.Array) -> list[tuple[tuple, Any]]:
    """Shapes of the model's perturbations at batch ``x``, as a flat list ``[(path, ShapeDtypeStruct)]``."""

    def shapes(s, inputs):
        module = nnx.merge(graphdef, s)
        _, perturbations = nnx.capture(module, nnx.Perturbation)(inputs)
        return perturbations

    template = jax.eval_shape(shapes, state, x)
    return [(path, var.get_value()) for path, var in nnx.to_flat_state(template)]


def zero_perturbations(model: nnx.Module, x: jax.Array) -> dict[str, jax.Array]:
    """``{"relu1": zeros(B, 14, 14, 32), ...}``: the NNX model's capture points at batch ``x``.

    Nested modules give ``"block/relu"`` (module path joined with "/"), as in Linen.
    """
    graphdef, state = nnx.split(model)
    return {
        SEP.join(map(str, path)): jnp.zeros(s.shape, s.dtype)
        for path, s in _perturbation_template(graphdef, state, x)
    }


def nnx_forward(model: nnx.Module, *, call_kwargs: Mapping | None = None):
    """``forward(perturbations, x) -> (outputs, updated BatchStat state or None)`` for an NNX model."""
    graphdef, state = nnx.split(model)
    kwargs = dict(call_kwargs or {})

    def forward(perturbations: dict[str, jax.Array], x: jax.Array):
        # A fresh copy per call: BatchNorm mutates its BatchStat, which NNX only
        # allows at the trace level where the Variable was created.
        module = nnx.merge(graphdef, state, copy=True)
        init = nnx.from_flat_state(
            [(tuple(name.split(SEP)), nnx.Perturbation(value)) for name, value in perturbations.items()]
        )
        outputs = nnx.capture(module, init=init)(x, **kwargs)
        batch_stats = nnx.state(module, nnx.BatchStat)
        return outputs, (batch_stats if jax.tree.leaves(batch_stats) else None)

    return forward


def penalized_loss(
    model: nnx.Module,
    x: jax.Array,
    y: jax.Array,
    *,
    penalty_weight: float | jax.Array,
    call_kwargs: Mapping | None = None,
    examples_interact: bool | None = None,
    **options,
) -> tuple[jax.Array, dict[str, Any]]:
    """``jax_impl.penalized_loss`` for an NNX ``model`` (its capture points use ``capture``).

    ``options`` are the Linen function's (``layers``, ``options=PenaltyOptions(...)``
    or its fields as keywords, ``example_weights``, ``loss_fn``); ``call_kwargs``
    are passed to ``model(x, **call_kwargs)``.
    BatchNorm statistics updated by the forward pass are written back into
    ``model`` (``nnx.update``) and also returned as ``aux["model_state"]``;
    ``examples_interact=None`` means "the model has BatchStat variables".
    """
    check_loss_inputs(x, penalty_weight)  # before the forward pass, which cannot take a batch of 0
    zeros = zero_perturbations(model, x)
    if examples_interact is None:
        examples_interact = bool(jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    total, aux = penalized_loss_from_forward(
        nnx_forward(model, call_kwargs=call_kwargs), zeros, x, y,
        penalty_weight=penalty_weight, examples_interact=examples_interact, **options,
    )
    if "model_state" in aux:
        nnx.update(model, aux["model_state"])
    return total, aux
