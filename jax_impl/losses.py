"""The classification loss the penalty differentiates, and its batch mean.

For logits ``z`` (B, K) and integer labels ``y`` (B,):

    CE_i = -log softmax(z_i)[y_i]                    (per_example_cross_entropy, (B,))
    loss = sum_i m_i CE_i / sum_i m_i                 (weighted_mean, (); mean(CE) without m)

PyTorch's ``nn.CrossEntropyLoss()`` is ``cross_entropy_loss`` without weights.
A 0/1 mask ``m`` (B,) makes ``loss`` the mean over the real examples of a
zero-padded batch. ``default_loss`` reads the logits from any model output
(``jax_impl.outputs.model_logits``), so ``penalized_loss`` takes Hugging Face
outputs as they are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jax_impl.outputs import model_logits

__all__ = ["cross_entropy_loss", "default_loss", "per_example_cross_entropy", "weighted_mean"]


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy of each example: (B, K), (B,) -> (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def weighted_mean(per_example: jax.Array, example_weights: jax.Array | None = None) -> jax.Array:
    """``mean(l)``, or ``sum_i m_i l_i / sum_i m_i`` with example weights ``m`` (B,)."""
    if example_weights is None:
        return per_example.mean()
    weights = example_weights.astype(per_example.dtype)
    return jnp.sum(weights * per_example) / jnp.sum(weights)


def cross_entropy_loss(
    logits: jax.Array, labels: jax.Array, example_weights: jax.Array | None = None
) -> jax.Array:
    """Mean softmax cross-entropy, PyTorch's ``nn.CrossEntropyLoss()``: (B, K), (B,) -> ().

    With ``example_weights`` m (B,) it is ``sum_i m_i CE_i / sum_i m_i``; a 0/1
    mask makes it the mean over the real examples of a zero-padded batch (the
    training loop pads its last partial batch so the step is not recompiled).
    """
    return weighted_mean(per_example_cross_entropy(logits, labels), example_weights)  # (B,) -> ()


def default_loss(outputs: Any, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy of the model's logits (``model_logits``: ``outputs.logits``,
    else element 0 of a tuple, else the outputs): (B, K), (B,) -> (B,)."""
    return per_example_cross_entropy(model_logits(outputs), labels)


def _batch_loss(loss_fn, y, example_weights):
    """The batch loss of a per-example one: ``outputs -> weighted_mean(loss_fn(outputs, y))``, ()."""
    return lambda outputs: weighted_mean(loss_fn(outputs, y), example_weights)
