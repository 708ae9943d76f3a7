"""Adversarial evaluation, framework-free: the attacks, their defaults, and the names of their metrics.

``jax_impl.attacks`` and ``torch_ref.attacks`` implement the same two
L-infinity attacks, ``TrainConfig`` and the ``--eval-*`` flags of both
training CLIs and of ``python -m jax_impl.sweep`` read the definitions below.
This module imports neither JAX nor PyTorch.

Both attacks ascend the cross-entropy of each example, ``CE_i = CE(f(x_i), y_i)``,
inside the L-infinity ball of radius ``eps`` around ``x`` and inside the
box ``[lo, hi]`` of valid inputs (``Dataset.input_range()``: [0, 1] for
digits, CIFAR-10 and synthetic data, the data's own min and max for .npz):

* FGSM (Goodfellow, Shlens and Szegedy, ICLR 2015), one step::

      x_adv = clip(x + eps * sign(d CE / d x), lo, hi)

* PGD (Madry et al., ICLR 2018), ``K`` steps of size ``alpha`` projected
  back onto the ball and the box after each step::

      x_0     = x                                              (no random start)
      x_{k+1} = clip(x_k + alpha * sign(d CE / d x (x_k)), max(x - eps, lo), min(x + eps, hi))
      x_adv   = x_K

  with ``K = DEFAULT_PGD_STEPS`` (10) and ``alpha = DEFAULT_PGD_STEP_RATIO * eps``
  (eps / 4) unless chosen: 10 steps of eps / 4 travel 2.5 eps, Madry's
  ``alpha = 2.5 eps / K``, enough to reach any corner of the ball from its centre.

**No random start.** Madry et al. start PGD at a uniform random point of the
ball; here it starts at ``x``, so an attack is a deterministic function of
the weights and the data: a run's accuracy under attack is reproducible and
JAX and PyTorch produce the same adversarial examples on the same weights.
The price: against a model whose gradient at ``x`` itself is uninformative
(gradient masking) a random start can find more; PGD here is never weaker
than FGSM with step ``alpha`` (its first step) but can be weaker than a
restarted PGD.

The gradient is that of the *sum* of the per-example losses, so each
example's step depends on that example only (for models whose examples do
not interact: no BatchNorm in training mode) and not on the batch size.
``sign(0) = 0``: an input entry the loss does not depend on is not moved.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

ATTACKS = ("fgsm", "pgd")
#: ``--eval-eps``: radii in units of the data's valid range ([0, 1] for images: 0.05 is 12.75 / 255).
DEFAULT_EPS = (0.05, 0.1)
DEFAULT_PGD_STEPS = 10
#: PGD's step size as a fraction of eps: alpha = ratio * eps.
DEFAULT_PGD_STEP_RATIO = 0.25
#: Prefix of the metric of each attack: ``eval_accuracy/fgsm@0.05`` in metrics.jsonl.
EVAL_ACCURACY_PREFIX = "eval_accuracy/"


class AttackOptionError(ValueError):
    """A bad attack option; ``field`` names it (``TrainConfig`` turns it into its ``--eval-*`` flag)."""

    def __init__(self, field: str, expected: str, value: Any):
        self.field, self.expected, self.value = field, expected, value
        super().__init__(f"{field} must be {expected}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Attack:
    """One attack of the evaluation (hashable, so a compiled evaluation can be keyed on it).

    ``name`` is ``"fgsm"`` or ``"pgd"``, ``eps`` the L-infinity radius; for
    PGD, ``steps`` K and the absolute ``step_size`` alpha (FGSM: 1 step of eps).
    """

    name: str
    eps: float
    steps: int = 1
    step_size: float | None = None

    @property
    def label(self) -> str:
        """``fgsm@0.05``: the attack and its radius."""
        return f"{self.name}@{self.eps:g}"

    @property
    def eval_key(self) -> str:
        """The key of its test accuracy in metrics.jsonl: ``eval_accuracy/fgsm@0.05``."""
        return EVAL_ACCURACY_PREFIX + self.label


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_attack_options(names: Sequence[str], eps: Sequence[float], pgd_steps: int,
                         pgd_step_ratio: float) -> None:
    """Raise ``AttackOptionError`` (naming the option) unless every option is valid.

    ``names``: a subset of ``ATTACKS`` without repeats; ``eps``: at least one
    finite number > 0, no two with the same ``label``; ``pgd_steps`` an
    integer >= 1; ``pgd_step_ratio`` a finite number > 0.
    """
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or len(set(names)) != len(names):
        raise AttackOptionError("attacks", f"a comma-separated subset of {list(ATTACKS)} without repeats",
                                ",".join(names))
    if not eps or any(not _real(e) or e <= 0 for e in eps):
        raise AttackOptionError("eps", "one or more finite numbers > 0 such as 0.05,0.1",
                                ",".join(map(str, eps)))
    labels = [f"{e:g}" for e in eps]
    if len(set(labels)) != len(labels):
        raise AttackOptionError("eps", "distinct radii (to 6 significant digits)", ",".join(labels))
    if not isinstance(pgd_steps, int) or isinstance(pgd_steps, bool) or pgd_steps < 1:
        raise AttackOptionError("pgd_steps", "an integer >= 1", pgd_steps)
    if not _real(pgd_step_ratio) or pgd_step_ratio <= 0:
        raise AttackOptionError("pgd_step_ratio", "a finite number > 0", pgd_step_ratio)


def attack_grid(names: Sequence[str], eps: Sequence[float], pgd_steps: int = DEFAULT_PGD_STEPS,
                pgd_step_ratio: float = DEFAULT_PGD_STEP_RATIO) -> tuple[Attack, ...]:
    """Every (attack, eps) pair, attacks in the order given: ``fgsm@e1, fgsm@e2, pgd@e1, pgd@e2``.

    Checked by ``check_attack_options`` (``AttackOptionError``).
    """
    check_attack_options(names, eps, pgd_steps, pgd_step_ratio)
    grid = []
    for name in names:
        for e in eps:
            if name == "fgsm":
                grid.append(Attack("fgsm", float(e)))
            else:
                grid.append(Attack("pgd", float(e), steps=pgd_steps, step_size=pgd_step_ratio * float(e)))
    return tuple(grid)


def check_attack_call(eps: Any, clip: tuple[float, float] | None, steps: int = 1,
                      step_size: Any = None) -> None:
    """``ValueError`` (one line) for arguments of ``fgsm``/``pgd`` that cannot be right.

    Checked when they are plain Python numbers (a traced or tensor ``eps`` is
    not looked at): ``eps`` and ``step_size`` finite and > 0, ``steps`` an
    integer >= 1, ``clip`` ``None`` or ``(lo, hi)`` with finite ``lo < hi``.
    """
    for name, value in (("eps", eps), ("step_size", step_size)):
        if isinstance(value, numbers.Real) and not (_real(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if clip is not None:
        try:
            lo, hi = (float(v) for v in clip)
        except (TypeError, ValueError):
            raise ValueError(f"clip must be None or (lo, hi), got {clip!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"clip must be (lo, hi) with finite lo < hi, got {clip!r}")
