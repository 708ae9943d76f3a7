"""Flatten order for the weight converter: which layers read a flattened channels-first map, and how.

PyTorch flattens a (B, C, *S) map as (c, *s), Flax a (B, *S, C) map as
(*s, c). A layer that reads such a flattened map (``Linear``, Hugging Face's
``Conv1D``, and ``BatchNorm1d`` or ``LayerNorm`` over the flattened features)
needs its feature axis permuted (``flatten_permutation``). This module finds
those readers, statically from registration order or by running the module
once on ``example_input`` (``torch_ref.convert``'s docstring, "Flatten order").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from torch_ref.convert_rules import flatten_permutation, is_hf_conv1d


def where(path: str, module: nn.Module) -> str:
    kind = type(module).__name__
    return f"module {path!r} ({kind})" if path else f"the root module ({kind})"


def feature_count(module: nn.Module) -> int | None:
    """Input features of a layer that may read a flattened map; None for other layers."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.BatchNorm1d):
        return module.num_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    if is_hf_conv1d(module):
        return module.weight.shape[0]
    return None


@dataclass(frozen=True)
class Unknown:
    """A reader whose map shape cannot be inferred statically; raised only if the trace does not settle it."""

    message: str


_CONVS = (nn.modules.conv._ConvNd,)  # Conv1d/2d/3d and ConvTranspose1d/2d/3d: channels-first maps
_SHAPE_WORDS = {2: "square", 3: "cube"}


def _side(area: int, rank: int) -> int | None:
    """s with s**rank == area, or None."""
    guess = round(area ** (1 / rank))
    return next((s for s in (guess - 1, guess, guess + 1) if s > 0 and s**rank == area), None)


def static_flatten_orders(module: nn.Module) -> dict[str, np.ndarray | Unknown | None]:
    """Readers' permutations from registration order (see ``torch_ref.convert``, "Flatten order")."""
    orders: dict[str, np.ndarray | Unknown | None] = {}
    conv: tuple[str, nn.Module, int, int] | None = None  # nearest preceding conv: (path, it, channels, rank)
    for path, layer in module.named_modules():
        features = feature_count(layer)
        if features is not None:
            orders[path] = None
            if conv is not None and features % conv[2] == 0:
                cpath, clayer, channels, rank = conv
                area = features // channels
                side = _side(area, rank)
                if side is not None:
                    orders[path] = flatten_permutation((channels, *[side] * rank)) if side > 1 else None
                else:
                    orders[path] = Unknown(
                        f"{where(path, layer)} reads {features} features after {type(clayer).__name__} "
                        f"{cpath!r} with {channels} channels: {features} = {channels} x {area} is not a "
                        f"{_SHAPE_WORDS.get(rank, 'regular')} map, so its flatten order is unknown; pass "
                        f"example_input (a batch in the module's input layout) so the converter can run the "
                        f"module once and see the shape")
        if isinstance(layer, _CONVS):
            conv = (path, layer, layer.out_channels, len(layer.kernel_size))
        elif isinstance(layer, (nn.Linear, nn.Embedding, nn.MultiheadAttention)) or is_hf_conv1d(layer):
            conv = None
    return orders


#: Functions that flatten (B, C, *S) -> (B, C*prod(S)) when the shapes say so.
_FLATTENS = {"flatten", "view", "reshape", "view_as", "reshape_as"}
#: Functions that reorder the axes of a map.
_AXIS_MOVES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
#: Functions whose 3-D output is a channels-first (B, C, L) map (other 3-D tensors are sequences).
_MAP_MAKERS = {"conv1d", "conv_transpose1d"}
#: Shape-preserving functions whose output features are *not* their input's (the tag must not follow).
_MIXING = {"linear", "bilinear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm",
           "einsum", "tensordot", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
           "conv_transpose3d", "flip", "roll", "sort", "cumsum", "cumprod", "gather", "index_select"}
#: Distinct sizes: a meta tensor of this shape, moved like the real one, shows where each axis went.
_PROBES = {3: (2, 3, 5), 4: (2, 3, 5, 7), 5: (2, 3, 5, 7, 11)}


class _FlattenTracker(TorchFunctionMode):
    """Tags tensors by id: maps whose axes were moved ("axes", order of the channels-first axes) and
    flattened maps ("flat", (C, *S), the order of (c, *s) in the flattened vector).

    4-D and 5-D tensors are taken as (B, C, H, W) and (B, C, D, H, W) maps; a
    3-D tensor only if a 1-D convolution made it (else it is a (B, T, D) sequence,
    which both frameworks flatten alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, tuple[torch.Tensor, tuple]] = {}  # the tensor is kept so its id stays unique

    def tag(self, x: Any) -> tuple | None:
        entry = self.tags.get(id(x))
        return entry[1] if entry is not None and entry[0] is x else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            self._follow(getattr(func, "__name__", ""), func, args, kwargs, out)
        return out

    def _axes(self, x: torch.Tensor) -> tuple[int, ...]:
        tag = self.tag(x)
        return tag[1] if tag is not None and tag[0] == "axes" else tuple(range(x.dim()))

    def _is_map(self, x: torch.Tensor) -> bool:
        tag = self.tag(x)
        return x.dim() in (4, 5) or (x.dim() == 3 and tag is not None and tag[0] == "axes")

    def _follow(self, name: str, func, args, kwargs, out: torch.Tensor) -> None:
        x = args[0]
        if name in _MAP_MAKERS and out.dim() == 3:
            self.tags[id(out)] = (out, ("axes", (0, 1, 2)))
        elif (name in _FLATTENS and self._is_map(x)
              and tuple(out.shape) == (x.shape[0], math.prod(x.shape[1:]))):
            axes = self._axes(x)
            if axes[0] == 0:  # batch axis in place: the vector runs over axes[1:] of the channels-first map
                shape = [0] * (x.dim() - 1)
                for k in range(1, x.dim()):
                    shape[axes[k] - 1] = x.shape[k]
                self.tags[id(out)] = (out, ("flat", tuple(shape), tuple(a - 1 for a in axes[1:])))
        elif name in _AXIS_MOVES and self._is_map(x):
            moved = func(torch.empty(_PROBES[x.dim()], device="meta"), *args[1:], **kwargs).shape
            axes = self._axes(x)
            self.tags[id(out)] = (out, ("axes", tuple(axes[_PROBES[x.dim()].index(size)] for size in moved)))
        elif name not in _MIXING:
            for arg in (*args, *kwargs.values()):
                tag = self.tag(arg)
                if tag is not None and arg.shape == out.shape:
                    self.tags[id(out)] = (out, tag)
                    break


def run(module: nn.Module, example_input: Any) -> Any:
    """``module(example_input)``: a tuple or list is positional inputs, a dict keyword inputs."""
    if isinstance(example_input, Mapping):
        return module(**example_input)
    if isinstance(example_input, (tuple, list)):
        return module(*example_input)
    return module(example_input)


def traced_flatten_orders(module: nn.Module, example_input: Any) -> dict[str, np.ndarray | None]:
    """Readers' permutations seen by running ``module(example_input)`` once (eval mode, no grad)."""
    tracker = _FlattenTracker()
    seen: dict[str, list[tuple]] = {}

    def record(path: str, layer: nn.Module, inputs: tuple) -> None:
        tag = tracker.tag(inputs[0]) if inputs else None
        seen.setdefault(path, []).append(tag[1:] if tag is not None and tag[0] == "flat" else None)

    handles = [layer.register_forward_pre_hook(functools.partial(record, path))
               for path, layer in module.named_modules() if feature_count(layer) is not None]
    modes = {layer: layer.training for layer in module.modules()}
    try:
        module.eval()  # eval: BatchNorm must not update its running statistics, dropout is the identity
        with torch.no_grad(), tracker:
            run(module, example_input)
    except Exception as error:
        raise ValueError(f"example_input: running {type(module).__name__} on it failed: "
                         f"{type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
        for layer, training in modes.items():
            layer.training = training
    orders: dict[str, np.ndarray | None] = {}
    for path, found in seen.items():
        if any(f != found[0] for f in found):
            raise ValueError(f"{where(path, module.get_submodule(path))} reads differently flattened inputs "
                             f"in one forward pass ({found}); convert it by hand")
        if found[0] is None:
            orders[path] = None
        else:
            perm = flatten_permutation(*found[0])
            orders[path] = None if np.array_equal(perm, np.arange(perm.size)) else perm
    return orders
