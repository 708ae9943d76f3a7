"""The seed answer's penalised loss and SGD step, and the question's procedure.

Answer (the reference)::

    grads = torch.autograd.grad(loss, [model.relu1, model.relu2], create_graph=True)
    grad_norm = sum(g.pow(2).sum() for g in grads)
    optimizer.zero_grad()
    loss = loss + grad_norm * grad_penalty_weight
    loss.backward()
    optimizer.step()

The answer also passes ``only_inputs=True``; current PyTorch ignores that
argument (deprecated), so it is left out here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def select_layers(available: Sequence[str], layers: Sequence[str] | str | None) -> tuple[str, ...]:
    """Validate ``layers`` against the model's capture names; ``None`` means all."""
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


def penalized_loss(
    model: nn.Module,
    input: torch.Tensor,
    label: torch.Tensor,
    penalty_weight: float,
    layers: Sequence[str] | str | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward pass and ``total = loss + w * sum_l ||d loss / d a_l||^2`` (seed answer).

    ``model`` must store its capture points during ``forward`` and expose them
    by name through ``model.captures()`` (``torch_ref.Net`` does). Returns
    ``(total, aux)`` with ``aux`` holding ``loss``, ``penalty``,
    ``penalty_terms``, ``activation_grads`` (NCHW, still in the graph) and
    ``logits``. ``total.backward()`` then puts the training gradient into the
    parameters' ``.grad``.
    """
    output = model(input)
    loss = nn.CrossEntropyLoss()(output, label)
    captures = model.captures()
    names = select_layers(tuple(captures), layers)
    grads = torch.autograd.grad(loss, [captures[n] for n in names], create_graph=True)
    terms = {n: g.pow(2).sum() for n, g in zip(names, grads, strict=True)}
    grad_norm = 0
    for term in terms.values():
        grad_norm += term
    total = loss + grad_norm * penalty_weight
    aux = {
        "loss": loss,
        "penalty": grad_norm,
        "penalty_terms": terms,
        "activation_grads": dict(zip(names, grads, strict=True)),
        "logits": output,
    }
    return total, aux


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    input: torch.Tensor,
    label: torch.Tensor,
    penalty_weight: float,
    layers: Sequence[str] | str | None = None,
) -> dict[str, Any]:
    """One step of the seed answer's loop: penalised loss, ``zero_grad``, ``backward``, ``step``."""
    total, aux = penalized_loss(model, input, label, penalty_weight, layers)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return {"total": total.detach(), **{k: aux[k] for k in ("loss", "penalty", "penalty_terms")}}


def question_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    input: torch.Tensor,
    label: torch.Tensor,
) -> None:
    """The seed *question*'s loop body, kept verbatim in spirit for comparison.

    It retains the activations' ``.grad``, calls ``loss.backward(retain_graph=True)``
    (weight gradients of the loss), then ``autograd.grad(..., create_graph=True)``
    and ``grad_norm.backward()``, which *adds* the penalty's weight gradients
    (with weight 1) and also accumulates into the retained activations' ``.grad``.
    Its weight gradients equal the answer's with ``penalty_weight=1``; its
    activation ``.grad`` fields are not d loss / d a (see the FAQ and the test).
    """
    output = model(input)
    model.relu1.retain_grad()
    model.relu2.retain_grad()
    loss = nn.CrossEntropyLoss()(output, label)
    optimizer.zero_grad()
    loss.backward(retain_graph=True)
    grads = torch.autograd.grad(loss, [model.relu1, model.relu2], create_graph=True)
    grad_norm = 0
    for grad in grads:
        grad_norm += grad.pow(2).sum()
    grad_norm.backward()
    optimizer.step()
