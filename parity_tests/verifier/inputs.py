"""A model's inputs as real models take them: one array, a tuple (positional) or a dict (keyword).

``Inputs`` is that structure with NumPy leaves: ``x`` (one array, called
``model(x)``), ``(a, b)`` (``model(a, b)``) or ``{"input_ids": ..., "attention_mask": ...}``
(``model(input_ids=..., attention_mask=...)``, Hugging Face's way). The functions here
move it between the frameworks without touching what must not change: only floating
leaves take the run's dtype (token ids and masks stay integers), and only rank-4
floating leaves (images) are transposed NCHW -> NHWC for a channels-last Flax twin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from parity_tests.harness import nchw_to_nhwc, to_numpy

#: ``"channels_last"``: rank-4 tensors are NCHW in PyTorch and NHWC in Flax (rank-4 floating inputs
#: are transposed before the Flax call, rank-4 activations and logits before the comparison);
#: ``"same"``: both frameworks use the PyTorch module's layout and nothing is transposed.
FLAX_LAYOUTS = ("channels_last", "same")

#: One input array, a tuple of positional inputs, or a dict of keyword inputs (NumPy leaves).
Inputs = np.ndarray | tuple[np.ndarray, ...] | dict[str, np.ndarray]


def map_inputs(fn: Callable[[Any], Any], x: Any) -> Any:
    """``fn`` applied to every leaf of ``x``, keeping its structure (a list becomes a tuple)."""
    if isinstance(x, Mapping):
        return {str(k): fn(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return tuple(fn(v) for v in x)
    return fn(x)


def leaves(x: Inputs) -> list[np.ndarray]:
    if isinstance(x, dict):
        return list(x.values())
    return list(x) if isinstance(x, tuple) else [x]


def as_numpy_inputs(x: Any, dtype: str) -> Inputs:
    """``x`` (arrays or tensors, any of the three structures) as NumPy; floating leaves cast to ``dtype``.

    Raises:
      ValueError: an empty tuple or dict, or a leaf that is not numeric.
    """
    if isinstance(x, Mapping | tuple | list) and not len(x):
        raise ValueError("x: expected an array, a tuple of positional inputs or a dict of keyword inputs; "
                         f"got an empty {type(x).__name__}")

    def leaf(a):
        a = to_numpy(a) if isinstance(a, torch.Tensor) else np.asarray(a)
        if a.dtype.kind not in "biuf":
            raise ValueError(f"x: every input must be a numeric array (float, int or bool), got dtype "
                             f"{a.dtype}")
        return a.astype(dtype) if a.dtype.kind == "f" else a

    return map_inputs(leaf, x)


def batch_size(x: Inputs) -> int:
    """The leading dimension of the first input (the batch the labels go with)."""
    first = leaves(x)[0]
    if first.ndim == 0:
        raise ValueError("x: the first input is a scalar; expected a batch (B, ...)")
    return int(first.shape[0])


def to_flax_layout(x: Inputs, flax_layout: str) -> Inputs:
    """The inputs for the Flax twin: rank-4 floating leaves NCHW -> NHWC under ``"channels_last"``."""
    def leaf(a):
        image = flax_layout == "channels_last" and a.ndim == 4 and a.dtype.kind == "f"
        return nchw_to_nhwc(a) if image else a

    return map_inputs(leaf, x)


def activation_to_flax_layout(a: np.ndarray, flax_layout: str) -> np.ndarray:
    """A PyTorch activation (or logits) in the Flax twin's layout: rank 4 NCHW -> NHWC under channels_last."""
    a = np.asarray(a)
    return nchw_to_nhwc(a) if flax_layout == "channels_last" and a.ndim == 4 else a


def to_torch(x: Inputs) -> Any:
    """Tensors in the same structure (sharing memory with contiguous copies of the arrays)."""
    return map_inputs(lambda a: torch.from_numpy(np.ascontiguousarray(a)), x)


def call_arguments(x: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the model call on ``x``: ``model(*args, **kwargs)``."""
    if isinstance(x, Mapping):
        return (), dict(x)
    if isinstance(x, tuple | list):
        return tuple(x), {}
    return (x,), {}


def describe(x: Inputs) -> str:
    """``(2, 3, 32, 32) float64`` or ``input_ids (2, 8) int64, attention_mask (2, 8) int64``: for messages."""
    def one(a):
        return f"{tuple(a.shape)} {a.dtype}"

    if isinstance(x, dict):
        return ", ".join(f"{k} {one(v)}" for k, v in x.items())
    return ", ".join(one(a) for a in leaves(x))
