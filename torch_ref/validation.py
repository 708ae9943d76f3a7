"""Input checks of ``torch_ref.Net`` and ``torch_ref.penalized_loss``, mirroring ``jax_impl.validation``.

A wrong input gets one ``ModelInputError`` (a ``ValueError``) naming the
expected shape, instead of PyTorch's internal size-mismatch message from deep
inside a layer. Shape and dtype checks are free; the label range check reads
two numbers (min, max) from the label tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from agp_common.errors import ModelInputError
from agp_common.penalty_spec import check_penalty_weight

__all__ = [
    "ModelInputError",
    "check_labels",
    "check_labels_fit_logits",
    "check_loss_inputs",
    "check_net_input",
    "first_input_tensor",
    "input_tensors",
    "min_image_size",
]


def min_image_size(side: int = 1) -> int:
    """Smallest input size whose two conv5x5 + pool2 stages give ``side`` pixels: ``4 * side + 12``."""
    return 4 * side + 12


def _stage(size: int) -> int:
    return (size - 4) // 2


def check_net_input(net: Any, x: torch.Tensor) -> None:
    """Raise ``ModelInputError`` unless ``x`` is NCHW (B, C, S, S) floating images that fit ``net``.

    C = ``net.conv1.in_channels``; S such that the features before ``linear``
    are ``64 * h' * w' = net.linear.in_features`` (S = 32 for the seed);
    dtype: floating, the same as the weights (PyTorch does not promote).
    """
    channels = net.conv1.in_channels
    _, side, _ = net.feature_shape
    size = min_image_size(side)
    expected = f"(B, {channels}, {size}, {size})"
    shape = tuple(x.shape)
    if x.dim() != 4:
        raise ModelInputError(f"Net: expected NCHW images of shape {expected}, got shape {shape} "
                              f"(rank {x.dim()}, expected rank 4)")
    if not x.is_floating_point():
        raise ModelInputError(f"Net: expected floating-point images of shape {expected}, got dtype {x.dtype}")
    weight_dtype = net.conv1.weight.dtype
    if x.dtype != weight_dtype:
        raise ModelInputError(f"Net: expected images of dtype {weight_dtype} (the model's), got {x.dtype}; "
                              f"use x.to({weight_dtype}) or net.to({x.dtype})")
    _, c, h, w = shape
    if c != channels:
        raise ModelInputError(f"Net: expected images of shape {expected} ({channels} channels), got shape "
                              f"{shape} ({c} channels)")
    features = 64 * max(_stage(_stage(h)), 0) * max(_stage(_stage(w)), 0)
    if features != net.linear.in_features:
        raise ModelInputError(f"Net: expected images of shape {expected} (the image_size the model was built "
                              f"for), got shape {shape}")


def input_tensors(x: Any) -> list[torch.Tensor]:
    """The tensors of a model input: ``x`` itself, a tuple's elements, a dict's values (in order)."""
    if isinstance(x, Mapping):
        items = list(x.values())
    elif isinstance(x, tuple):
        items = list(x)
    else:
        items = [x]
    return [t for t in items if isinstance(t, torch.Tensor)]


def first_input_tensor(x: Any, where: str = "penalized_loss") -> torch.Tensor:
    """The tensor that sets the batch size: ``x``, or the first tensor of a tuple or dict input.

    Raises ``ModelInputError`` when there is none, or when it is a scalar (no batch axis).
    """
    tensors = input_tensors(x)
    if not tensors:
        raise ModelInputError(f"{where}: expected the input as a tensor, a tuple of positional inputs or a "
                              f"dict of keyword inputs holding at least one tensor, got {type(x).__name__}")
    first = tensors[0]
    if first.dim() == 0:
        raise ModelInputError(f"{where}: the input's first tensor is a scalar; expected a batch (B, ...)")
    return first


def _shape_or_type(v: Any) -> str:
    return str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__


def describe_input(x: Any) -> str:
    """``(4, 3, 32, 32)`` for a tensor; ``dict input_ids (2, 5), attention_mask (2, 5)`` for a dict."""
    if isinstance(x, torch.Tensor):
        return str(tuple(x.shape))
    if isinstance(x, Mapping):
        return "dict " + ", ".join(f"{k} {_shape_or_type(v)}" for k, v in x.items())
    parts = [_shape_or_type(v) for v in x]
    return "tuple " + ", ".join(parts)


def check_loss_inputs(input: Any, penalty_weight: Any) -> None:
    """Raise ``ModelInputError`` for a batch of 0 examples, NaN/Inf in ``input``, or a ``penalty_weight``
    that is not one finite number >= 0; the checks of ``jax_impl.validation`` (eager there, always here).

    ``input`` is a tensor, a tuple of positional inputs or a dict of keyword
    inputs; the batch size is the first tensor's leading axis, every floating
    tensor must be finite.
    """
    first = first_input_tensor(input)
    if first.shape[0] == 0:
        raise ModelInputError(f"penalized_loss: input holds no examples ({describe_input(input)}); "
                              "expected a batch of at least one")
    for t in input_tensors(input):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelInputError("penalized_loss: input contains NaN or Inf; expected finite inputs")
    if isinstance(penalty_weight, torch.Tensor):
        penalty_weight = penalty_weight.detach().cpu().numpy()
    check_penalty_weight(penalty_weight)


def num_classes_of(model: Any) -> int | None:
    """``model.num_classes``, else the output size of a final ``linear`` layer (``Net``), else None."""
    if isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes
    linear = getattr(model, "linear", None)
    return linear.out_features if isinstance(linear, torch.nn.Linear) else None


def _check_label_range(y: torch.Tensor, num_classes: int | None, classes: str, found_in: str = "") -> None:
    if y.numel():
        low, high = int(y.min()), int(y.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            raise ModelInputError(f"penalized_loss: labels must be class indices in {classes}{found_in}, "
                                  f"found values from {low} to {high}")


def check_labels(model: Any, x: Any, y: Any, loss_fn: Any = None) -> None:
    """Raise ``ModelInputError`` unless ``y`` is (B,) integer labels in ``[0, K)``, K from ``model``.

    With a custom ``loss_fn`` the labels can be anything it takes: nothing is checked.
    B is the batch size of ``x`` (``first_input_tensor``); a model whose K is
    not known here is checked after the forward pass (``check_labels_fit_logits``).
    """
    if loss_fn is not None:
        return
    num_classes = num_classes_of(model)
    batch = first_input_tensor(x).shape[0]
    classes = f"[0, {num_classes})" if num_classes is not None else "[0, K)"
    if not isinstance(y, torch.Tensor):
        raise ModelInputError(f"penalized_loss: expected labels as an integer tensor of shape ({batch},), "
                              f"got {type(y).__name__}; use torch.as_tensor(labels)")
    if tuple(y.shape) != (batch,):
        raise ModelInputError(f"penalized_loss: expected labels of shape ({batch},) (one integer class in "
                              f"{classes} per example of input {describe_input(x)}), got shape "
                              f"{tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ModelInputError(f"penalized_loss: expected integer class labels of shape ({batch},) in "
                              f"{classes}, got dtype {y.dtype}; use label.long()")
    _check_label_range(y, num_classes, classes)


def check_labels_fit_logits(logits: Any, y: torch.Tensor) -> None:
    """Raise for logits the default loss cannot take, or labels outside ``[0, K)``, K = ``logits.shape[1]``.

    The default loss is softmax cross-entropy over (B, K) logits; anything else
    needs a ``loss_fn``.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        found = (f"shape {tuple(logits.shape)}, dtype {logits.dtype}" if isinstance(logits, torch.Tensor)
                 else type(logits).__name__)
        raise ModelInputError("penalized_loss: the default loss (softmax cross-entropy) needs floating "
                              f"logits (B, K) (the output, its .logits, or element 0 of a tuple), got "
                              f"{found}; pass loss_fn=lambda outputs, y: per-example loss of shape (B,)")
    num_classes = logits.shape[1]
    _check_label_range(y, num_classes, f"[0, {num_classes})", " (K from the logits)")
