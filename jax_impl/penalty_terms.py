"""From the activation gradients to the penalty: exact terms, or Finlay & Oberman's estimate.

With ``g_l = d loss / d a_l`` (B, ...) and, per example, ``G_{l,i} = d loss_i / d a_{l,i}``,
the term of layer ``l`` before ``layer_weights`` is (``phi`` the identity for
``norm="squared_l2"``, ``sqrt`` for ``"l2"``; formulas in ``agp_common.penalty_spec``)

    batch_mean:   phi(||g_l||^2)                               ()
    per_example:  sum_i m_i phi(||G_{l,i}||^2) / sum_i m_i      () from (B,); the mean without m

``_exact_terms`` computes them from the gradients (the penalty then
differentiates through them: double backprop). ``_finite_difference_penalty``
estimates the weighted penalty from one more forward pass along the detached
gradient, ``((loss(a + h v) - loss(a)) / h)^2`` with
``v = Lambda g / sqrt(g^T Lambda g)``, so only first-order differentiation is
needed. ``_safe_sqrt`` keeps the L2 norm's derivative finite at 0.
The PyTorch twins (``_safe_sqrt``, ``_phi``, ``_per_example_squares``,
``_finite_difference_penalty``) are listed in docs/parity.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from agp_common.penalty_spec import PenaltyOptions
from jax_impl.forward import _perturbed
from jax_impl.losses import _batch_loss, weighted_mean


def _sum_over_examples(v: jax.Array) -> jax.Array:
    """Per-example sum of squares over all non-batch axes: (B, ...) -> (B,)."""
    return jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=1)


def _safe_sqrt(s: jax.Array) -> jax.Array:
    """``sqrt(s)`` whose derivative at ``s == 0`` is 0 instead of inf (so 0 * inf never makes NaN)."""
    positive = s > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


def _apply_norm(squared: jax.Array, norm: str) -> jax.Array:
    return squared if norm == "squared_l2" else _safe_sqrt(squared)



def _exact_terms(grads, norm, per_example, example_weights):
    """Per-layer terms before ``layer_weights``: ``phi(||g_l||^2)`` or ``mean_i phi(||G_{l,i}||^2)``."""
    if not per_example:
        return {name: _apply_norm(jnp.sum(jnp.square(g)), norm) for name, g in grads.items()}
    return {
        name: weighted_mean(_apply_norm(_sum_over_examples(g), norm), example_weights)
        for name, g in grads.items()
    }


def _finite_difference_penalty(
    forward, zeros, x, y, loss_fn, example_weights, grads, base_loss, options: PenaltyOptions,
):
    """Finlay & Oberman (2019): ``phi(||g||^2)`` from a directional finite difference.

    With ``g`` detached, ``v = Lambda g / sqrt(g^T Lambda g)`` and
    ``d = (loss(a + h v) - loss(a)) / h = sqrt(g^T Lambda g) + O(h)``, the
    squared-L2 penalty ``sum_l lambda_l ||g_l||^2`` is estimated by ``d^2``
    (one joint shift of all layers), the L2 one by ``sum_l lambda_l d_l`` (one
    shift per layer, ``v_l = g_l / ||g_l||``). Differentiating ``d`` w.r.t. the
    parameters is ordinary backprop, and
    ``grad_theta d^2 = 2 (dg/dtheta)^T Lambda g + O(h)``: the exact gradient up
    to O(h). Per example the same holds example by example, with every
    example shifted along its own direction in one forward pass (exact only
    when examples do not interact).
    """
    norm, fd_step = options.norm, options.fd_step
    per_example = options.normalization == "per_example"
    weights = {name: options.weight_of(name) for name in grads}
    groups = [tuple(grads)] if norm == "squared_l2" else [(name,) for name in grads]
    per_loss = (lambda out: loss_fn(out, y)) if per_example else _batch_loss(loss_fn, y, example_weights)
    run = _perturbed(forward, zeros, x, per_loss)
    if base_loss is None:
        base, _ = run({name: jnp.zeros_like(g) for name, g in grads.items()})  # (B,)
    else:
        base = base_loss
    penalty = 0.0
    for group in groups:
        # Squared length of the weighted direction, per example (B,) or for the batch ().
        # (squared L2: g^T Lambda g over the group; L2: the one layer's ||g_l||^2, unweighted).
        lam = weights if norm == "squared_l2" else dict.fromkeys(weights, 1.0)
        if per_example:
            sq = sum(lam[n] * _sum_over_examples(grads[n]) for n in group)  # (B,)
        else:
            sq = sum(lam[n] * jnp.sum(jnp.square(grads[n])) for n in group)  # ()
        positive = sq > 0
        inv_len = jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, sq, 1.0)), 0.0)
        shifts = {}
        for name, g in grads.items():
            if name not in group:
                shifts[name] = jnp.zeros_like(g)
                continue
            scale = inv_len.reshape((-1,) + (1,) * (g.ndim - 1)) if per_example else inv_len
            shifts[name] = fd_step * lam[name] * scale * g
        shifted, _ = run(shifts)
        d = (shifted - base) / fd_step  # (B,) or ()
        if norm == "squared_l2":
            contribution = jnp.square(d)
        else:
            contribution = weights[group[0]] * d
        if per_example:
            contribution = weighted_mean(contribution, example_weights)
        penalty = penalty + contribution
    return penalty
