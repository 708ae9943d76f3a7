"""Input checks of ``torch_ref.Net`` and ``torch_ref.penalized_loss``, mirroring ``jax_impl.validation``.

A wrong input gets one ``ModelInputError`` (a ``ValueError``) naming the
expected shape, instead of PyTorch's internal size-mismatch message from deep
inside a layer. Shape and dtype checks are free; the label range check reads
two numbers (min, max) from the label tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from agp_common.errors import ModelInputError
from agp_common.penalty_spec import check_penalty_weight

__all__ = ["ModelInputError", "check_labels", "check_loss_inputs", "check_net_input", "min_image_size"]


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


def check_loss_inputs(input: torch.Tensor, penalty_weight: Any) -> None:
    """Raise ``ModelInputError`` for a batch of 0 examples, NaN/Inf in ``input``, or a ``penalty_weight``
    that is not one finite number >= 0; the checks of ``jax_impl.validation`` (eager there, always here).
    """
    if input.dim() >= 1 and input.shape[0] == 0:
        raise ModelInputError(f"penalized_loss: input holds no examples (shape {tuple(input.shape)}); "
                              "expected a batch of at least one")
    if input.is_floating_point() and not bool(torch.isfinite(input).all()):
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


def check_labels(model: Any, x: torch.Tensor, y: torch.Tensor, loss_fn: Any = None) -> None:
    """Raise ``ModelInputError`` unless ``y`` is (B,) integer labels in ``[0, K)``, K from ``model``.

    With a custom ``loss_fn`` the labels can be anything it takes: nothing is checked.
    """
    if loss_fn is not None:
        return
    num_classes = num_classes_of(model)
    batch = x.shape[0] if x.dim() >= 1 else None
    classes = f"[0, {num_classes})" if num_classes is not None else "[0, K)"
    if tuple(y.shape) != (batch,):
        raise ModelInputError(f"penalized_loss: expected labels of shape ({batch},) (one integer class in "
                              f"{classes} per example of input {tuple(x.shape)}), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ModelInputError(f"penalized_loss: expected integer class labels of shape ({batch},) in "
                              f"{classes}, got dtype {y.dtype}; use label.long()")
    if batch:
        low, high = int(y.min()), int(y.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            raise ModelInputError(f"penalized_loss: labels must be class indices in {classes}, found values "
                                  f"from {low} to {high}")
