"""The optimizers of ``--optimizer``, defined once for optax and ``torch.optim``.

Each name maps to an update rule and its keywords; ``agp_app.jax_recipe.named_optimizer`` (optax)
and ``agp_app.torch_recipe.named_optimizer`` (``torch.optim``) turn the rule, with ``--weight-decay``
in the ``--weight-decay-form`` (coupled, the CLI default, or decoupled; the two forms'
update rules are in ``agp_app.jax_recipe``'s docstring), into their library's optimizer, the
one place each framework builds one; their update rules agree: SGD ``p -= lr * g``; with
momentum ``m = mu * m + g`` (no dampening), ``p -= lr * m``; Adam with betas (0.9, 0.999) and
eps 1e-8 added outside the square root, bias-corrected (``optax.adam`` and ``torch.optim.Adam``
with their defaults).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from agp_app.config import MOMENTUM, OPTIMIZERS
from agp_app.errors import UsageError


class OptimizerRule(NamedTuple):
    """``kind``: ``"sgd"`` or ``"adam"``; ``kwargs``: keywords besides the learning rate."""

    kind: str
    kwargs: dict[str, Any]


#: ``--optimizer`` name -> its rule: plain SGD (the seed's), SGD with momentum ``MOMENTUM``, Adam.
OPTIMIZER_RULES = {
    "sgd": OptimizerRule("sgd", {}),
    "momentum": OptimizerRule("sgd", {"momentum": MOMENTUM}),
    "adam": OptimizerRule("adam", {}),
}
assert tuple(OPTIMIZER_RULES) == OPTIMIZERS


def optimizer_rule(name: str) -> OptimizerRule:
    """The rule of ``--optimizer name``; ``UsageError`` naming the choices for any other name."""
    if name not in OPTIMIZER_RULES:
        raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZER_RULES)}; got {name!r}")
    return OPTIMIZER_RULES[name]
