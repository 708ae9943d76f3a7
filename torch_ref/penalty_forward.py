"""The forward pass the penalty differentiates: its capture points' activations and the input leaf.

A capture point is an activation ``a`` whose gradient ``d loss / d a`` the
penalty measures. Without ``capture_modules`` they are the attributes the
model's ``forward`` stores (``self.relu1 = ...``, the seed answer's way),
differentiated directly; with it, forward hooks on those submodules, each
output perturbed by a zero leaf (``torch_ref.capture``). The ``"input"``
capture point is a leaf that replaces the first input tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from agp_common.penalty_spec import INPUT
from torch_ref.capture import call_model, forward_with_perturbations
from torch_ref.model import CAPTURE_NAMES
from torch_ref.validation import ModelInputError, describe_input, first_input_tensor, input_tensors


def stored_captures(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The activations ``model.forward`` stored as attributes, by capture name (the seed answer's way).

    ``model.captures()`` when the model has it (``torch_ref.Net``); otherwise
    ``getattr(model, name)`` for each name in ``layers`` (default: the seed's
    ``relu1``, ``relu2``; ``"input"`` is not an attribute and is skipped).
    """
    if callable(getattr(model, "captures", None)):
        return model.captures()
    names = [name for name in (CAPTURE_NAMES if layers is None else layers) if name != INPUT]
    captured = {}
    for name in names:
        value = getattr(model, name, None)
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"capture point {name!r}: {type(model).__name__}.forward did not store a tensor "
                f"self.{name}; store the activation as the seed answer does (self.{name} = ...), or pass "
                f"capture_modules={{{name!r}: 'module.path'}} (forward hooks)"
            )
        captured[name] = value
    return captured


def forward_pass(model, input, capture_modules, layers, shifts=None):
    """``(output, {name: activation}, {name: tensor to differentiate})`` of one forward pass.

    Without ``capture_modules``: the attributes ``forward`` stores, differentiated
    directly (the seed answer's way); with it: forward hooks, each hooked output
    perturbed by a zero leaf ``z`` (``torch_ref.capture.forward_with_perturbations``).
    """
    if capture_modules is None:
        if shifts:
            raise ValueError(
                "shifting activations (approx='finite_difference') needs capture_modules (forward hooks); "
                "for torch_ref.Net or the seed's Net pass capture_modules=torch_ref.NET_CAPTURE_MODULES"
            )
        output = call_model(model, input)
        captured = stored_captures(model, layers)
        return output, captured, dict(captured)
    return forward_with_perturbations(model, input, capture_modules, shifts)


def check_some_capture_points(names: Sequence[str]) -> None:
    """A penalty over zero capture points would be a silent 0: refuse it."""
    if not names:
        raise ValueError("the model has no capture points: nothing to penalise; pass capture_modules="
                         "{name: 'module.path'} (torch_ref.capture_points(model, x) lists them) or put "
                         f"{INPUT!r} in layers")


def with_input_leaf(input: Any) -> tuple[Any, torch.Tensor]:
    """``(input with its first tensor replaced by a leaf, that leaf)``, for the ``"input"`` capture point.

    The input gradient is taken with respect to the first tensor of ``input``
    (the tensor itself, a tuple's first, a dict's first value), which must be
    floating-point: token ids have no gradient.
    """
    first = first_input_tensor(input)
    if not first.is_floating_point():
        raise ModelInputError(
            f"penalized_loss: the {INPUT!r} capture point needs a floating-point input tensor (its "
            f"gradient), got {first.dtype} as the first input tensor of {describe_input(input)}; drop "
            f"{INPUT!r} from layers and capture the embeddings module instead (capture_modules=...)")
    leaf = first.detach().requires_grad_(True)
    return replace_first_tensor(input, leaf), leaf


def replace_first_tensor(input: Any, new: torch.Tensor) -> Any:
    """``input`` with its first tensor (``first_input_tensor``) replaced by ``new``."""
    if isinstance(input, torch.Tensor):
        return new
    first = input_tensors(input)[0]
    if isinstance(input, Mapping):
        key = next(k for k, v in input.items() if v is first)
        return {**input, key: new}
    index = next(i for i, v in enumerate(input) if v is first)
    return (*input[:index], new, *input[index + 1:])
