"""FGSM and PGD adversarial examples (L-infinity) in PyTorch, mirroring ``jax_impl.attacks``.

The formulas, the defaults (PGD: 10 steps of eps / 4) and why PGD has no
random start are in ``agp_common.attack_spec``; in short, with
``g = d CE_i / d x_i`` the gradient of each example's own cross-entropy::

    fgsm:  x_adv = clip(x + eps * sign(g(x)), lo, hi)
    pgd:   x_{k+1} = clip(x_k + alpha * sign(g(x_k)), max(x - eps, lo), min(x + eps, hi)),  x_0 = x

The model is any ``nn.Module`` (or function) mapping ``x`` to logits (B, K);
the seed's ``Net`` takes NCHW images ``(B, C, H, W)``, where ``jax_impl.attacks``
takes NHWC ``(B, H, W, C)``. The model's mode is left as it is: call
``model.eval()`` first if it has dropout or BatchNorm. Parameter ``.grad``
fields are not touched (``torch.autograd.grad`` with respect to the input only).
This module never imports JAX.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from agp_common.attack_spec import DEFAULT_PGD_STEP_RATIO, DEFAULT_PGD_STEPS, Attack, check_attack_call

Model = nn.Module | Callable[[torch.Tensor], torch.Tensor]
Clip = tuple[float, float] | None


def input_gradient(model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d (sum_i CE_i) / d x``, detached, shape of ``x``; row i is ``d CE_i / d x_i``.

    The sum, not the mean, so that a row does not carry the batch's 1/B.
    Works under ``torch.no_grad()`` too. JAX: ``jax_impl.attacks.input_gradient``.
    """
    with torch.enable_grad():
        inputs = x.detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(inputs), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, inputs)
    return grad


def _clip(x: torch.Tensor, clip: Clip) -> torch.Tensor:
    return x if clip is None else torch.clamp(x, clip[0], clip[1])


def fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, clip: Clip) -> torch.Tensor:
    """Fast gradient sign method: ``clip(x + eps * sign(d CE_i / d x_i), lo, hi)``, detached.

    ``x`` (B, ...) inputs, ``y`` (B,) int64 labels, ``eps`` > 0 the L-infinity
    radius, ``clip`` ``(lo, hi)`` the valid input range (``None``: unbounded).
    ``torch.sign(0) = 0``, as ``jnp.sign``.
    """
    check_attack_call(eps, clip)
    g = input_gradient(model, x, y)
    return _clip(x.detach() + eps * torch.sign(g), clip)


def pgd(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = DEFAULT_PGD_STEPS,
        step_size: float | None = None, clip: Clip) -> torch.Tensor:
    """Projected gradient descent (ascent of CE) in the L-infinity ball of ``eps``, no random start.

    ``x_0 = x``; ``x_{k+1} = clip(x_k + alpha * sign(d CE_i / d x (x_k)), max(x - eps, lo),
    min(x + eps, hi))`` for ``steps`` K steps of ``step_size`` alpha (``None``:
    ``DEFAULT_PGD_STEP_RATIO * eps`` = eps / 4); returns ``x_K``, detached.
    """
    if step_size is None:
        step_size = DEFAULT_PGD_STEP_RATIO * eps
    check_attack_call(eps, clip, steps, step_size)
    x = x.detach()
    lower, upper = x - eps, x + eps  # the ball, intersected with the valid range below
    if clip is not None:
        lower, upper = torch.clamp(lower, min=clip[0]), torch.clamp(upper, max=clip[1])
    x_k = x
    for _ in range(steps):
        g = input_gradient(model, x_k, y)
        x_k = torch.minimum(torch.maximum(x_k + step_size * torch.sign(g), lower), upper)
    return x_k


def adversarial_examples(model: Model, x: torch.Tensor, y: torch.Tensor, attack: Attack, *,
                         clip: Clip) -> torch.Tensor:
    """The examples of ``attack`` (an ``agp_common.attack_spec.Attack``): ``fgsm`` or ``pgd``."""
    if attack.name == "fgsm":
        return fgsm(model, x, y, attack.eps, clip=clip)
    if attack.name == "pgd":
        return pgd(model, x, y, attack.eps, steps=attack.steps, step_size=attack.step_size, clip=clip)
    raise ValueError(f"attack must be 'fgsm' or 'pgd', got {attack.name!r}")


def adversarial_correct(model: Model, x: torch.Tensor, y: torch.Tensor, attacks: Sequence[Attack], *,
                        clip: Clip) -> dict[str, int]:
    """``{attack.eval_key: number of examples still classified right under that attack}``.

    An example already misclassified clean counts as wrong (it needs no attack).
    """
    out = {}
    for attack in attacks:
        x_adv = adversarial_examples(model, x, y, attack, clip=clip)
        with torch.no_grad():
            out[attack.eval_key] = int((model(x_adv).argmax(dim=1) == y).sum())
    return out
