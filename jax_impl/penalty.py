"""The activation gradient penalty, as one small pure function.

For a model with capture points ``a_l`` (marked with ``layers.capture``) and
the batch-mean cross-entropy

    loss = (1/B) * sum_i CE(f(x_i), y_i),

the penalty of the seed answer is

    penalty = sum_{l in layers} || d loss / d a_l ||_2^2      (sum over every entry)
    total   = loss + penalty_weight * penalty.

``d loss / d a_l`` is obtained as the gradient with respect to a zero
perturbation added at ``a_l`` (Flax's ``perturb``); the gradient of ``total``
with respect to the parameters then differentiates through that gradient
(double backprop), exactly like ``torch.autograd.grad(..., create_graph=True)``
followed by ``backward()``.

Because ``loss`` is a batch *mean*, each example's slice of ``d loss / d a``
carries a factor 1/B, so with examples that do not interact the penalty is
(1/B^2) * sum_i ||d CE_i / d a_i||^2: it shrinks like 1/B at a fixed
per-example gradient size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jax_impl.layers import PERTURBATIONS

Params = Any
SEP = "/"


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy, PyTorch's ``nn.CrossEntropyLoss()``: (B, K), (B,) -> ()."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def zero_perturbations(model, params: Params, x: jax.Array) -> dict[str, jax.Array]:
    """Zero perturbations for every capture point of ``model`` at the batch ``x``.

    Returns a flat dict ``{"relu1": zeros(B, 14, 14, 32), ...}`` keyed by capture
    name (nested modules give ``"block/relu"``). Shapes come from tracing only
    (``jax.eval_shape``), so this is free under ``jit`` and always matches the
    batch size of ``x``, not the one the model was initialised with.
    """

    def perturbation_tree(p, inputs):
        _, state = model.apply({"params": p}, inputs, mutable=[PERTURBATIONS])
        return state.get(PERTURBATIONS, {})

    shapes = jax.eval_shape(perturbation_tree, params, x)
    flat = traverse_util.flatten_dict(shapes, sep=SEP)
    return {name: jnp.zeros(s.shape, s.dtype) for name, s in flat.items()}


def select_layers(available: Sequence[str], layers: Sequence[str] | str | None) -> tuple[str, ...]:
    """Validate ``layers`` against the model's capture points; ``None`` means all."""
    if layers is None:
        return tuple(available)
    if isinstance(layers, str):
        layers = (layers,)
    layers = tuple(layers)
    unknown = [name for name in layers if name not in available]
    if unknown:
        raise ValueError(
            f"unknown penalty layer(s) {unknown}; the model's capture points are {list(available)}"
        )
    if not layers:
        raise ValueError(f"layers is empty; choose from {list(available)} or pass None for all")
    if len(set(layers)) != len(layers):
        raise ValueError(f"penalty layers contain duplicates: {list(layers)}")
    return layers


def loss_and_activation_grads(
    params: Params, model, x: jax.Array, y: jax.Array, layers: Sequence[str] | str | None = None
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Return ``(loss, logits, {name: d loss / d a_name})`` for the chosen layers.

    Gradients have the activations' shapes, e.g. ``relu1`` (B, 14, 14, 32). Only
    the chosen layers are differentiated; the others get constant zeros.
    """
    zeros = zero_perturbations(model, params, x)
    layers = select_layers(tuple(zeros), layers)

    def loss_fn(chosen):
        perturbations = traverse_util.unflatten_dict({**zeros, **chosen}, sep=SEP)
        logits = model.apply({"params": params, PERTURBATIONS: perturbations}, x)
        return cross_entropy_loss(logits, y), logits

    chosen = {name: zeros[name] for name in layers}
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(chosen)
    return loss, logits, grads


def penalized_loss(
    params: Params,
    model,
    x: jax.Array,
    y: jax.Array,
    *,
    penalty_weight: float | jax.Array,
    layers: Sequence[str] | str | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """``total = loss + penalty_weight * sum_l ||d loss / d a_l||^2`` and its parts.

    Args:
      params: the model's ``"params"`` collection.
      model: a Flax Linen module whose capture points use ``layers.capture``
        (e.g. ``Net()``); it is applied as ``model.apply({"params": params,
        "perturbations": ...}, x)``.
      x: inputs, NHWC for ``Net``: (B, 32, 32, C). Any batch size.
      y: integer class labels (B,).
      penalty_weight: the weight ``w`` (the seed answer uses 10).
      layers: capture names to penalise; ``None`` (default) penalises all.

    Returns:
      ``(total, aux)`` with ``aux`` holding ``loss``, ``penalty``,
      ``penalty_terms`` (``{layer: ||d loss / d a_layer||^2}``),
      ``activation_grads`` (``{layer: d loss / d a_layer}``) and ``logits``.
      ``jax.grad(lambda p: penalized_loss(p, ...)[0])(params)`` is the training
      gradient (double backprop).

    PyTorch equivalent (the seed answer)::

        grads = torch.autograd.grad(loss, [relu1, relu2], create_graph=True)
        total = loss + w * sum(g.pow(2).sum() for g in grads)
    """
    loss, logits, grads = loss_and_activation_grads(params, model, x, y, layers)
    terms = {name: jnp.sum(jnp.square(g)) for name, g in grads.items()}
    penalty = sum(terms.values())
    total = loss + penalty_weight * penalty
    aux = {
        "loss": loss,
        "penalty": penalty,
        "penalty_terms": terms,
        "activation_grads": grads,
        "logits": logits,
    }
    return total, aux
