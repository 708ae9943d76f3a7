"""FGSM and PGD adversarial examples (L-infinity) in JAX, and the accuracy under attack.

The formulas, the defaults (PGD: 10 steps of eps / 4) and why PGD has no
random start are in ``agp_common.attack_spec``; in short, with
``g = d CE_i / d x_i`` the gradient of each example's own cross-entropy::

    fgsm:  x_adv = clip(x + eps * sign(g(x)), lo, hi)
    pgd:   x_{k+1} = clip(x_k + alpha * sign(g(x_k)), max(x - eps, lo), min(x + eps, hi)),  x_0 = x

The model is reached through ``apply_fn(variables, x) -> logits`` (B, K), so
a Flax Linen model is attacked with its own ``apply``::

    x_adv = fgsm(model.apply, {"params": params}, x, y, 0.1, clip=(0.0, 1.0))

and anything else ``apply`` needs (``train=False``, ``batch_stats``) is
bound into ``apply_fn`` or ``variables``. Every function is pure and can be
``jax.jit``-ed with ``apply_fn`` static (``functools.partial``).

PyTorch equivalent: ``torch_ref.attacks`` (same names, NCHW inputs, the model
itself in place of ``apply_fn, variables``). On identical weights in float64
both give the same FGSM and PGD examples bit for bit wherever the two
gradients have the same sign, which is everywhere except at entries whose
gradient is at rounding level (``parity_tests/test_attacks.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from agp_common.attack_spec import DEFAULT_PGD_STEP_RATIO, DEFAULT_PGD_STEPS, Attack, check_attack_call

#: ``apply_fn(variables, x) -> logits``: ``Module.apply`` or a function with its signature.
ApplyFn = Callable[[Any, jax.Array], jax.Array]
Clip = tuple[float, float] | None


def input_gradient(apply_fn: ApplyFn, variables: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """``d (sum_i CE_i) / d x``: same shape as ``x`` (B, ...); row i is ``d CE_i / d x_i``.

    The sum, not the mean, so that a row does not carry the batch's 1/B
    (examples that do not interact). PyTorch: ``torch_ref.attacks.input_gradient``.
    """

    def summed_loss(inputs):
        logits = apply_fn(variables, inputs)  # (B, K)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return jax.grad(summed_loss)(x)


def _clip(x: jax.Array, clip: Clip) -> jax.Array:
    return x if clip is None else jnp.clip(x, clip[0], clip[1])


def fgsm(apply_fn: ApplyFn, variables: Any, x: jax.Array, y: jax.Array, eps: float | jax.Array, *,
         clip: Clip) -> jax.Array:
    """Fast gradient sign method: ``clip(x + eps * sign(d CE_i / d x_i), lo, hi)``, shape of ``x``.

    ``x`` (B, ...) inputs, ``y`` (B,) integer labels, ``eps`` > 0 the L-infinity
    radius, ``clip`` ``(lo, hi)`` the valid input range (``None``: unbounded).
    ``sign(0) = 0``: entries the loss does not depend on stay put.
    """
    check_attack_call(eps, clip)
    g = input_gradient(apply_fn, variables, x, y)  # (B, ...)
    return _clip(x + eps * jnp.sign(g), clip)


def pgd(apply_fn: ApplyFn, variables: Any, x: jax.Array, y: jax.Array, eps: float | jax.Array, *,
        steps: int = DEFAULT_PGD_STEPS, step_size: float | jax.Array | None = None, clip: Clip) -> jax.Array:
    """Projected gradient descent (ascent of CE) in the L-infinity ball of ``eps``, no random start.

    ``x_0 = x``; ``x_{k+1} = clip(x_k + alpha * sign(d CE_i / d x (x_k)), max(x - eps, lo),
    min(x + eps, hi))`` for ``steps`` K steps of ``step_size`` alpha (``None``:
    ``DEFAULT_PGD_STEP_RATIO * eps`` = eps / 4); returns ``x_K``, shape of ``x``.
    One step with alpha = eps is ``fgsm``. Compiled as one ``lax.fori_loop``.
    """
    if step_size is None:
        step_size = DEFAULT_PGD_STEP_RATIO * eps
    check_attack_call(eps, clip, steps, step_size)
    lower, upper = x - eps, x + eps  # the ball, intersected with the valid range below
    if clip is not None:
        lower, upper = jnp.maximum(lower, clip[0]), jnp.minimum(upper, clip[1])

    def step(_, x_k):
        g = input_gradient(apply_fn, variables, x_k, y)
        return jnp.clip(x_k + step_size * jnp.sign(g), lower, upper)

    return jax.lax.fori_loop(0, steps, step, x)


def adversarial_examples(apply_fn: ApplyFn, variables: Any, x: jax.Array, y: jax.Array, attack: Attack, *,
                         clip: Clip) -> jax.Array:
    """The examples of ``attack`` (an ``agp_common.attack_spec.Attack``): ``fgsm`` or ``pgd``."""
    if attack.name == "fgsm":
        return fgsm(apply_fn, variables, x, y, attack.eps, clip=clip)
    if attack.name == "pgd":
        return pgd(apply_fn, variables, x, y, attack.eps, steps=attack.steps, step_size=attack.step_size,
                   clip=clip)
    raise ValueError(f"attack must be 'fgsm' or 'pgd', got {attack.name!r}")


def adversarial_correct(apply_fn: ApplyFn, variables: Any, x: jax.Array, y: jax.Array,
                        attacks: Sequence[Attack], *, clip: Clip,
                        mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """``{attack.eval_key: () number of examples still classified right under that attack}``.

    ``mask`` (B,) 0/1 counts only the real rows of a zero-padded batch (each
    row's attack depends on that row only, so padding changes nothing else).
    An example already misclassified clean counts as wrong (it needs no attack).
    """
    weights = jnp.ones(y.shape, x.dtype) if mask is None else mask.astype(x.dtype)  # (B,)
    out = {}
    for attack in attacks:
        x_adv = adversarial_examples(apply_fn, variables, x, y, attack, clip=clip)
        right = jnp.argmax(apply_fn(variables, x_adv), axis=-1) == y  # (B,)
        out[attack.eval_key] = jnp.sum(right.astype(x.dtype) * weights)
    return out
