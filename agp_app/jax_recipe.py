"""The training recipe's JAX side: the ``--lr-schedule`` as an optax schedule, SGD with weight decay.

Same numbers as ``agp_app.schedules.learning_rate`` and as ``agp_app.torch_recipe``
(``parity_tests/test_recipe_parity.py`` checks one step of each framework against the other).

Weight decay comes in two forms (``wd`` = ``--weight-decay``, ``mu`` = momentum, ``g`` = gradient,
``lr`` = this update's rate); ``p`` is every parameter, biases and normalisation scales included,
as ``torch.optim.SGD(model.parameters(), weight_decay=wd)`` does:

* coupled, the SGD form (L2 regularisation folded into the gradient; ``torch.optim.SGD(weight_decay=wd)``,
  ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, mu))``)::

      m = mu * m + (g + wd * p);   p = p - lr * m

  the decay passes through the momentum, so in steady state it acts ``1 / (1 - mu)`` times stronger;
* decoupled, AdamW-style (Loshchilov & Hutter's SGDW with the decay scaled by the current rate, as
  ``torch.optim.AdamW`` and ``optax.adamw`` scale it)::

      m = mu * m + g;              p = p - lr * (m + wd * p)

  the decay never enters the momentum buffer. PyTorch has no such SGD: ``agp_app.torch_recipe``
  provides it.

Warning: the same ``--weight-decay`` number is not the same regularisation in both forms; the
CIFAR ResNet recipes' ``5e-4`` is the coupled form's.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from agp_app.optim import optimizer_rule
from agp_app.schedules import STEP_FACTOR, STEP_MILESTONES, check_schedule, step_boundaries


def optax_schedule(*, base_lr: float, schedule: str, total_steps: int, warmup_steps: int = 0,
                   step_milestones: Sequence[float] = STEP_MILESTONES,
                   step_factor: float = STEP_FACTOR) -> optax.Schedule:
    """``agp_app.schedules.learning_rate`` as an optax schedule of the update count (same formulas).

    ``optax.join_schedules`` of ``optax.linear_schedule(0, base_lr, W)`` and, from update ``W`` on,
    ``optax.constant_schedule``, ``optax.cosine_decay_schedule(base_lr, T - W)`` or
    ``optax.piecewise_constant_schedule`` with the boundaries shifted by ``W``. ``ValueError`` as
    ``check_schedule``.
    """
    check_schedule(base_lr=base_lr, schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps,
                   step_milestones=step_milestones, step_factor=step_factor)
    span = total_steps - warmup_steps
    if schedule == "constant":
        after = optax.constant_schedule(base_lr)
    elif schedule == "cosine":
        after = optax.cosine_decay_schedule(base_lr, span)
    else:
        scales: dict[int, float] = {}
        for boundary in step_boundaries(total_steps, warmup_steps, step_milestones):
            # milestones that fall on the same update multiply (a dict holds one scale per boundary)
            scales[boundary - warmup_steps] = scales.get(boundary - warmup_steps, 1.0) * step_factor
        after = optax.piecewise_constant_schedule(base_lr, scales)
    joined = after if warmup_steps == 0 else optax.join_schedules(
        [optax.linear_schedule(0.0, base_lr, warmup_steps), after], [warmup_steps])

    def schedule_fn(count: jax.Array) -> jax.Array:
        # optax counts updates in int32, and its linear schedule divides that int32 count in float32
        # even in 64-bit mode; a count in the default float dtype (exact up to 2**24 updates in
        # float32) gives float64 rates under jax_enable_x64, as learning_rate computes them
        return joined(jnp.asarray(count, jnp.result_type(float)))

    return schedule_fn


def make_optimizer(learning_rate: float | jax.Array | optax.Schedule, *, momentum: float | None = None,
                   weight_decay: float | jax.Array = 0.0,
                   decoupled: bool = True) -> optax.GradientTransformation:
    """SGD (with ``momentum`` unless None or 0) and weight decay in the form ``decoupled`` says.

    ``learning_rate`` may be a number, a traced scalar (a rate computed on the host per update with
    ``agp_app.schedules.learning_rate``, so a schedule does not recompile the step), or an optax
    schedule (``optax_schedule``; its count then lives in the optimizer state). Update rules in the
    module docstring. With ``weight_decay == 0`` (a Python number) this is exactly
    ``optax.sgd(learning_rate, momentum)``, the same state tree as before weight decay existed
    (checkpoints stay loadable).
    """
    momentum = momentum or None  # optax.sgd's "no momentum"; 0 would keep a useless buffer
    if isinstance(weight_decay, int | float) and weight_decay == 0:
        return optax.sgd(learning_rate, momentum=momentum)
    decay = optax.add_decayed_weights(weight_decay)
    trace = optax.trace(decay=momentum) if momentum is not None else optax.identity()
    parts = [trace, decay] if decoupled else [decay, trace]  # decoupled: the decay skips the momentum
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


def named_optimizer(name: str, learning_rate: float | jax.Array | optax.Schedule, *,
                    weight_decay: float | jax.Array = 0.0,
                    decoupled: bool = False) -> optax.GradientTransformation:
    """``--optimizer name`` (``agp_app.optim.optimizer_rule``: sgd, momentum, adam) with weight decay.

    SGD kinds: ``make_optimizer``. Adam: ``optax.adam`` (betas 0.9/0.999, eps 1e-8, as
    ``torch.optim.Adam``); with weight decay, coupled ``g + wd * p`` enters the moments
    (``torch.optim.Adam(weight_decay=wd)``), decoupled ``p -= lr * (adam_update + wd * p)``
    (``optax.adamw``, ``torch.optim.AdamW``). ``weight_decay == 0``: exactly ``optax.adam`` / ``optax.sgd``.
    """
    rule = optimizer_rule(name)
    if rule.kind == "sgd":
        return make_optimizer(learning_rate, momentum=rule.kwargs.get("momentum"), weight_decay=weight_decay,
                              decoupled=decoupled)
    if isinstance(weight_decay, int | float) and weight_decay == 0:
        return optax.adam(learning_rate)
    decay = optax.add_decayed_weights(weight_decay)
    parts = [optax.scale_by_adam(), decay] if decoupled else [decay, optax.scale_by_adam()]
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))
