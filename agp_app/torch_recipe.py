"""The training recipe's PyTorch side: SGD with coupled or decoupled weight decay, the rate per update.

The update rules are those of ``agp_app.jax_recipe`` (its docstring gives both forms)::

    coupled (torch.optim.SGD(weight_decay=wd)):   m = mu * m + (g + wd * p);   p = p - lr * m
    decoupled (SGDW, AdamW-style):                m = mu * m + g;              p = p - lr * (m + wd * p)

PyTorch ships only the coupled form for SGD; ``DecoupledSGD`` adds the other one the way
``torch.optim.AdamW`` does (multiply ``p`` by ``1 - lr * wd``, then take the plain step).

The rate of each update comes from ``agp_app.schedules.learning_rate`` (no ``LambdaLR``, whose
state and off-by-one conventions would be a second definition)::

    for t in range(start, total):                 # t: updates done before this one
        set_learning_rate(optimizer, learning_rate(t, base_lr=..., schedule=..., ...))
        loss.backward(); optimizer.step()
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from agp_app.optim import optimizer_rule


class DecoupledSGD(torch.optim.SGD):
    """``torch.optim.SGD`` (``weight_decay=0``) with decoupled weight decay ``decoupled_weight_decay``.

    Each ``step`` first multiplies every parameter that has a gradient by ``1 - lr * wd``
    (``lr`` the group's current rate), then takes SGD's step: ``p = p - lr * (m + wd * p_old)``
    with ``m = mu * m + g`` (the gradient was computed at ``p_old``, so decaying first is the same
    update; this is what ``torch.optim.AdamW`` does). The coefficient is a param-group entry, so it
    is saved and restored with ``state_dict``.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, decoupled_weight_decay: float = 0.0):
        if decoupled_weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0; got {decoupled_weight_decay}")
        super().__init__(params, lr=lr, momentum=momentum)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", decoupled_weight_decay)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # the gradient must exist before the decay is applied
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            factor = 1 - group["lr"] * group["decoupled_weight_decay"]
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(factor)
        super().step()
        return loss


def make_optimizer(model: nn.Module | Iterable[torch.Tensor], *, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0, decoupled: bool = True) -> torch.optim.Optimizer:
    """SGD over all of ``model``'s parameters with weight decay in the form ``decoupled`` says.

    ``lr`` is the first rate; set each update's with ``set_learning_rate``. With
    ``weight_decay == 0`` this is ``torch.optim.SGD(params, lr, momentum)``, the optimizer (and
    state_dict) used before weight decay existed.
    """
    if weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0; got {weight_decay}")
    params = model.parameters() if isinstance(model, nn.Module) else model
    if weight_decay == 0 or not decoupled:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return DecoupledSGD(params, lr=lr, momentum=momentum, decoupled_weight_decay=weight_decay)


def named_optimizer(name: str, params: nn.Module | Iterable[torch.Tensor], lr: float, *,
                    weight_decay: float = 0.0, decoupled: bool = False) -> torch.optim.Optimizer:
    """``--optimizer name`` (``agp_app.optim.optimizer_rule``: sgd, momentum, adam) with weight decay.

    The update rules of ``agp_app.jax_recipe.named_optimizer``: SGD kinds ``make_optimizer``; Adam
    ``torch.optim.Adam`` (coupled ``weight_decay``) or ``torch.optim.AdamW`` (decoupled).
    """
    rule = optimizer_rule(name)
    if rule.kind == "sgd":
        return make_optimizer(params, lr=lr, momentum=rule.kwargs.get("momentum", 0.0),
                              weight_decay=weight_decay, decoupled=decoupled)
    params = params.parameters() if isinstance(params, nn.Module) else params
    if weight_decay and decoupled:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Use rate ``lr`` for the next ``optimizer.step()`` in every param group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
