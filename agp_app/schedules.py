"""Learning-rate schedules of ``--lr-schedule``, one definition for both frameworks (plain Python).

``learning_rate(t, ...)`` is the rate of the update with index ``t``: ``t`` optimizer updates were
done before it (0 for the first update; a metrics record with ``"step": s`` was produced by update
``t = s - 1``). With ``T = total_steps``, ``W = warmup_steps`` and ``b = base_lr``:

    warmup      t < W:   b * t / W                      (linear from 0; the first update has rate 0)
    constant    t >= W:  b
    cosine      t >= W:  b * 0.5 * (1 + cos(pi * min(t - W, T - W) / (T - W)))
    step        t >= W:  b * factor ** #{k : t >= W + floor(m_k * (T - W))}

so both decays run over the ``T - W`` updates after the warmup (the cosine reaches 0 at ``t = T``,
one past the last update; the step milestones ``m_k`` are fractions of that span, (0.5, 0.75) by
default, as in the CIFAR ResNet recipes' epochs 100 and 150 of 200 when ``W = 0``). The warmup
matches ``optax.linear_schedule(0, b, W)`` and Flax's ImageNet example; the cosine matches
``optax.cosine_decay_schedule(b, T - W)``; ``agp_app.jax_recipe.optax_schedule`` builds the same
numbers from optax's pieces, and the PyTorch trainer sets each update's rate from this function
(``agp_app.torch_recipe.set_learning_rate``), so both frameworks use identical rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: ``--lr-schedule`` choices.
SCHEDULES = ("constant", "cosine", "step")
#: Default milestones of the step schedule: fractions of the updates after the warmup.
STEP_MILESTONES = (0.5, 0.75)
#: Default factor applied at each milestone of the step schedule.
STEP_FACTOR = 0.1


def check_schedule(*, base_lr: float, schedule: str, total_steps: int, warmup_steps: int,
                   step_milestones: Sequence[float] = STEP_MILESTONES,
                   step_factor: float = STEP_FACTOR) -> None:
    """``ValueError`` with one line naming the flag and the fix for an invalid schedule; else nothing."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if not (math.isfinite(base_lr) and base_lr >= 0):
        raise ValueError(f"--lr must be a finite number >= 0; got {base_lr!r}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"a learning-rate schedule needs at least 1 step; got total_steps={total_steps!r}")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"--warmup-steps must be an integer in [0, {total_steps}) (the run's total steps); "
                         f"got {warmup_steps!r}")
    if any(not 0 <= m <= 1 for m in step_milestones):
        raise ValueError(f"step milestones must be fractions in [0, 1]; got {tuple(step_milestones)}")
    if not (math.isfinite(step_factor) and step_factor >= 0):
        raise ValueError(f"the step schedule's factor must be a finite number >= 0; got {step_factor!r}")


def step_boundaries(total_steps: int, warmup_steps: int,
                    step_milestones: Sequence[float] = STEP_MILESTONES) -> list[int]:
    """Update indices at which the step schedule multiplies by its factor: ``W + floor(m_k * (T - W))``."""
    return [warmup_steps + math.floor(m * (total_steps - warmup_steps)) for m in step_milestones]


def learning_rate(step: int, *, base_lr: float, schedule: str, total_steps: int, warmup_steps: int = 0,
                  step_milestones: Sequence[float] = STEP_MILESTONES,
                  step_factor: float = STEP_FACTOR) -> float:
    """The learning rate of update ``step`` (0-based; the module docstring gives the formulas).

    ``step`` beyond ``total_steps`` keeps the last phase's value (cosine: 0). Raises ``ValueError``
    for invalid settings (``check_schedule``) or a negative ``step``.
    """
    check_schedule(base_lr=base_lr, schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps,
                   step_milestones=step_milestones, step_factor=step_factor)
    if step < 0:
        raise ValueError(f"the update index must be >= 0; got {step}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return float(base_lr)
    if schedule == "cosine":
        span = total_steps - warmup_steps
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))
    passed = sum(step >= b for b in step_boundaries(total_steps, warmup_steps, step_milestones))
    return base_lr * step_factor**passed
