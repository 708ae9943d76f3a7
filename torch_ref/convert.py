"""Weight conversion between PyTorch module trees and Flax variable trees.

One converter for any ``nn.Module`` built from the layers below. Cross-framework
by nature, it speaks NumPy on the Flax side (nested dicts of arrays, the layout
of a Flax model's ``variables``) so that it never imports JAX::

    params = torch_ref.export_flax_params(torch_model)              # {"conv1": {"kernel": ...}, ...}
    logits = flax_model.apply({"params": jax.tree.map(jnp.asarray, params)}, x_nhwc)
    torch_ref.load_flax_params(torch_model, jax.tree.map(np.asarray, flax_params))

Layer rules, applied explicitly to every tensor (one small function per layer
type below; ``I/g`` is ``in_channels / groups``):

====================  =================================  ==================================
PyTorch layer         PyTorch tensor                     Flax leaf
====================  =================================  ==================================
``Conv2d``            weight (O, I/g, kh, kw)            params kernel (kh, kw, I/g, O)
                      bias (O,)                          params bias (O,)
``Linear``            weight (O, I)                      params kernel (I, O), rows permuted
                                                         if it reads a flattened map (below)
                      bias (O,)                          params bias (O,)
``BatchNorm1d/2d``    weight, bias (F,)                  params scale, bias (F,)
                      running_mean, running_var (F,)     batch_stats mean, var (F,)
``LayerNorm``         weight, bias (F,)                  params scale, bias (F,)
``GroupNorm``         weight, bias (C,)                  params scale, bias (C,)
``Embedding``         weight (N, D)                      params embedding (N, D)
====================  =================================  ==================================

A missing tensor gives a missing leaf: ``bias=False`` -> no ``bias``;
BatchNorm ``affine=False`` -> no params, ``track_running_stats=False`` -> no
``batch_stats``; LayerNorm ``elementwise_affine=False`` -> nothing. BatchNorm's
``num_batches_tracked`` has no Flax counterpart: it is neither exported nor
loaded. A ``Conv2d``'s stride, padding, dilation and groups are not weights:
the Flax model states its own (``nn.Conv(strides=, padding=, kernel_dilation=,
feature_group_count=)``); PyTorch and Flax split the channels into groups the
same way, so the kernel rule is the same for every ``groups``. A LayerNorm with
a multi-dimensional ``normalized_shape`` is refused: which Flax axes it maps to
depends on the layout (NCHW vs NHWC), so it is converted by hand.

Parameter-free modules (activations, pooling, dropout, flatten, containers such
as ``nn.Sequential``) are skipped. Any other module that owns parameters or
buffers itself (an unknown layer type, or an ``nn.Parameter`` set directly on a
container) is an error naming its path and type: nothing is skipped silently.

**Names.** By default the PyTorch module path ``block1.conv`` is the Flax path
``{"block1": {"conv": ...}}``. ``name_map`` renames: its keys are PyTorch
module paths and act as *prefixes* of whole path components, the longest
matching key wins (an exact path beats the prefix above it), and the rest of
the path is kept. Values are Flax paths written with ``/`` or ``.``; ``""``
means the root. ``{"features": "backbone", "features.0": "conv1"}`` maps
``features.0`` -> ``conv1``, ``features.3`` -> ``backbone/3`` and
``features.3.bn`` -> ``backbone/3/bn``; ``"features"`` does not match
``features2``.

**Flatten order.** PyTorch flattens a (B, C, H, W) map as (c, h, w), Flax a
(B, H, W, C) map as (h, w, c). A layer that reads such a flattened map
(``Linear``, and ``BatchNorm1d`` or ``LayerNorm`` over the flattened features)
has its feature axis permuted, not only transposed. Which layers do is found so:

* with ``example_input`` (the module's own input, any batch size), the module
  runs once in eval mode under ``torch.no_grad``. A ``TorchFunctionMode``
  tags every ``flatten``/``view``/``reshape`` that turns a (B, C, H, W) tensor
  into (B, C*H*W) (following ``permute``/``transpose``/``movedim``/``swapaxes``
  before it, so ``x.permute(0, 2, 3, 1).flatten(1)`` is already in Flax's
  order), the tag follows shape-preserving operations (ReLU, dropout,
  normalisation, ``contiguous``), and a forward pre-hook on each reader looks
  its input up;
* otherwise (and for a reader that forward did not reach) it is inferred from
  the order the modules were registered in: a reader with F input features
  whose nearest preceding ``Conv2d``/``Linear``/``Embedding`` is a ``Conv2d``
  with C output channels reads a (C, s, s) map if F = C*s*s (a square map;
  s = 1 when F = C: global pooling, no permutation); if it is a ``Linear`` or
  ``Embedding``, or there is none, it reads a vector (no permutation). If F is
  a multiple of C but F/C is not a square, the map's height and width are
  unknown: a ``ValueError`` asks for ``example_input``.

So a model that flattens its *input image* straight into a ``Linear`` (an MLP
on images) needs ``example_input``: without it the image reads as a vector.

**Checks.** Every shape is checked before anything is written: an error names
the tensor by its full Flax path (``params['block1']['conv']['kernel']``) with
the expected and found shapes in the caller's layout (Flax layout when
loading), missing and unexpected leaves are listed by full path, and nothing in
the module changes when a check fails. Loaded values are cast to the module's
dtype (like ``load_state_dict``). Every conversion is a permutation of entries,
so round trips are bit-exact.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "conv_kernel_to_flax",
    "conv_kernel_to_torch",
    "export_flax_params",
    "export_flax_variables",
    "flatten_permutation",
    "linear_kernel_to_flax",
    "linear_kernel_to_torch",
    "load_flax_params",
    "load_flax_variables",
]

NameMap = Mapping[str, str]

#: Collections a Flax ``init`` may return that hold no weights; ``load_flax_variables`` ignores them.
IGNORED_COLLECTIONS = ("perturbations", "intermediates")


# ----------------------------------------------------------------------------- layout helpers


def conv_kernel_to_flax(weight: np.ndarray) -> np.ndarray:
    """(O, I, kh, kw) -> (kh, kw, I, O)."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def conv_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """(kh, kw, I, O) -> (O, I, kh, kw)."""
    return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def linear_kernel_to_flax(weight: np.ndarray, feature_shape: tuple[int, int, int]) -> np.ndarray:
    """(K, C*H*W) in (c, h, w) order -> (H*W*C, K) in (h, w, c) order."""
    c, h, w = feature_shape
    k = weight.shape[0]
    return np.ascontiguousarray(weight.reshape(k, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, k))


def linear_kernel_to_torch(kernel: np.ndarray, feature_shape: tuple[int, int, int]) -> np.ndarray:
    """(H*W*C, K) in (h, w, c) order -> (K, C*H*W) in (c, h, w) order."""
    c, h, w = feature_shape
    k = kernel.shape[1]
    return np.ascontiguousarray(kernel.reshape(h, w, c, k).transpose(3, 2, 0, 1).reshape(k, c * h * w))


def flatten_permutation(feature_shape: tuple[int, int, int], axes: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    """Index ``p`` such that ``flax_vector = torch_vector[p]`` for a flattened (C, H, W) map.

    ``torch_vector`` is the map flattened with its axes in the order ``axes``
    ((0, 1, 2): (c, h, w), a plain NCHW flatten; (1, 2, 0): (h, w, c), a
    flatten after ``permute(0, 2, 3, 1)``); ``flax_vector`` is the same map
    flattened as Flax does, NHWC, (h, w, c). The inverse is ``np.argsort(p)``.
    """
    c, h, w = feature_shape
    chw_index = np.arange(c * h * w).reshape(c, h, w)  # (C, H, W): position in a (c, h, w) flatten
    torch_order = chw_index.transpose(tuple(axes)).ravel()  # torch_vector[i] holds chw entry torch_order[i]
    flax_order = chw_index.transpose(1, 2, 0).ravel()  # flax_vector[j] holds chw entry flax_order[j]
    return np.argsort(torch_order)[flax_order]


# ------------------------------------------------------------------------------ layer rules


@dataclass(frozen=True)
class _Leaf:
    """How one PyTorch tensor of a layer becomes one Flax leaf (layouts as in the module table)."""

    collection: str  # "params" or "batch_stats"
    name: str  # Flax leaf name: "kernel", "scale", "mean", ...
    attr: str  # PyTorch attribute: "weight", "running_mean", ...
    flax_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _vector_rule(perm: np.ndarray | None) -> tuple[Callable, Callable]:
    """(to_flax, to_torch) of a per-feature vector: permuted when its layer reads a flattened map."""
    if perm is None:
        return _same, _same
    inverse = np.argsort(perm)
    return (lambda v: v[perm]), (lambda v: v[inverse])


def _conv2d_leaves(conv: nn.Conv2d, perm: None) -> list[_Leaf]:
    o, i, kh, kw = conv.weight.shape  # i = in_channels / groups
    leaves = [_Leaf("params", "kernel", "weight", (kh, kw, i, o), conv_kernel_to_flax, conv_kernel_to_torch)]
    if conv.bias is not None:
        leaves.append(_Leaf("params", "bias", "bias", (o,), _same, _same))
    return leaves


def _linear_leaves(linear: nn.Linear, perm: np.ndarray | None) -> list[_Leaf]:
    o, i = linear.weight.shape
    if perm is None:
        to_flax, to_torch = (lambda w: w.T), (lambda k: k.T)
    else:  # Flax kernel row j reads flax_vector[j] = torch_vector[perm[j]]
        inverse = np.argsort(perm)
        to_flax, to_torch = (lambda w: w.T[perm]), (lambda k: k[inverse].T)
    leaves = [_Leaf("params", "kernel", "weight", (i, o), to_flax, to_torch)]
    if linear.bias is not None:
        leaves.append(_Leaf("params", "bias", "bias", (o,), _same, _same))
    return leaves


def _batch_norm_leaves(bn: nn.modules.batchnorm._BatchNorm, perm: np.ndarray | None) -> list[_Leaf]:
    shape, (to_flax, to_torch) = (bn.num_features,), _vector_rule(perm)
    leaves = []
    if bn.affine:
        leaves += [_Leaf("params", "scale", "weight", shape, to_flax, to_torch),
                   _Leaf("params", "bias", "bias", shape, to_flax, to_torch)]
    if bn.track_running_stats:
        leaves += [_Leaf("batch_stats", "mean", "running_mean", shape, to_flax, to_torch),
                   _Leaf("batch_stats", "var", "running_var", shape, to_flax, to_torch)]
    return leaves


def _layer_norm_leaves(ln: nn.LayerNorm, perm: np.ndarray | None) -> list[_Leaf]:
    shape, (to_flax, to_torch) = tuple(ln.normalized_shape), _vector_rule(perm)
    leaves = []
    if ln.weight is not None:
        leaves.append(_Leaf("params", "scale", "weight", shape, to_flax, to_torch))
    if ln.bias is not None:
        leaves.append(_Leaf("params", "bias", "bias", shape, to_flax, to_torch))
    return leaves


def _group_norm_leaves(gn: nn.GroupNorm, perm: None) -> list[_Leaf]:
    if not gn.affine:
        return []
    shape = (gn.num_channels,)
    return [_Leaf("params", "scale", "weight", shape, _same, _same),
            _Leaf("params", "bias", "bias", shape, _same, _same)]


def _embedding_leaves(emb: nn.Embedding, perm: None) -> list[_Leaf]:
    return [_Leaf("params", "embedding", "weight", tuple(emb.weight.shape), _same, _same)]


#: Layer type -> rule. Subclasses use their base's rule (e.g. MultiheadAttention's out_proj Linear).
_RULES: dict[type, Callable[[Any, Any], list[_Leaf]]] = {
    nn.Conv2d: _conv2d_leaves,
    nn.Linear: _linear_leaves,
    nn.BatchNorm1d: _batch_norm_leaves,
    nn.BatchNorm2d: _batch_norm_leaves,
    nn.LayerNorm: _layer_norm_leaves,
    nn.GroupNorm: _group_norm_leaves,
    nn.Embedding: _embedding_leaves,
}
_SUPPORTED = ", ".join(cls.__name__ for cls in _RULES)
#: Tensors a known layer owns that have no Flax counterpart.
_IGNORED_TENSORS = {"num_batches_tracked"}


def _rule(module: nn.Module) -> Callable | None:
    return next((_RULES[cls] for cls in type(module).__mro__ if cls in _RULES), None)


def _where(path: str, module: nn.Module) -> str:
    kind = type(module).__name__
    return f"module {path!r} ({kind})" if path else f"the root module ({kind})"


def _owned(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers the module holds itself (not its children's)."""
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


# --------------------------------------------------------------------------- flatten order


def _feature_count(module: nn.Module) -> int | None:
    """Input features of a layer that may read a flattened map; None for other layers."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.BatchNorm1d):
        return module.num_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    return None


@dataclass(frozen=True)
class _Unknown:
    """A reader whose map shape cannot be inferred statically; raised only if the trace does not settle it."""

    message: str


def _static_flatten_orders(module: nn.Module) -> dict[str, np.ndarray | _Unknown | None]:
    """Readers' permutations from registration order (see the module docstring's "Flatten order")."""
    orders: dict[str, np.ndarray | _Unknown | None] = {}
    conv: tuple[str, int] | None = None  # (path, out_channels) of the nearest preceding Conv2d, if it is
    for path, layer in module.named_modules():
        features = _feature_count(layer)
        if features is not None:
            orders[path] = None
            if conv is not None and features % conv[1] == 0:
                channels, area = conv[1], features // conv[1]
                side = math.isqrt(area)
                if side * side == area:
                    orders[path] = flatten_permutation((channels, side, side)) if side > 1 else None
                else:
                    orders[path] = _Unknown(
                        f"{_where(path, layer)} reads {features} features after Conv2d {conv[0]!r} with "
                        f"{channels} channels: {features} = {channels} x {area} is not a square map, so its "
                        f"(C, H, W) flatten order is unknown; pass example_input (a batch in the module's "
                        f"input layout) so the converter can run the module once and see the shape")
        if isinstance(layer, nn.Conv2d):
            conv = (path, layer.out_channels)
        elif isinstance(layer, (nn.Linear, nn.Embedding)):
            conv = None
    return orders


#: Functions that flatten (B, C, H, W) -> (B, C*H*W) when the shapes say so.
_FLATTENS = {"flatten", "view", "reshape", "view_as", "reshape_as"}
#: Functions that reorder the axes of a 4-D tensor.
_AXIS_MOVES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
#: Shape-preserving functions whose output features are *not* their input's (the tag must not follow).
_MIXING = {"linear", "bilinear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm",
           "einsum", "tensordot", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
           "conv_transpose3d", "flip", "roll", "sort", "cumsum", "cumprod", "gather", "index_select"}
#: Distinct sizes: a meta tensor of this shape, moved like the real one, shows where each axis went.
_PROBE = (2, 3, 5, 7)


class _FlattenTracker(TorchFunctionMode):
    """Tags tensors by id: 4-D maps whose axes were moved ("axes", order of the NCHW axes) and
    flattened maps ("flat", (C, H, W), the order of (c, h, w) in the flattened vector)."""

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
        return tag[1] if tag is not None and tag[0] == "axes" else (0, 1, 2, 3)

    def _follow(self, name: str, func, args, kwargs, out: torch.Tensor) -> None:
        x = args[0]
        if name in _FLATTENS and x.dim() == 4 and tuple(out.shape) == (x.shape[0], math.prod(x.shape[1:])):
            axes = self._axes(x)
            if axes[0] == 0:  # batch axis in place: the flattened vector runs over axes[1:] of the NCHW map
                chw = [0, 0, 0]
                for k in (1, 2, 3):
                    chw[axes[k] - 1] = x.shape[k]
                self.tags[id(out)] = (out, ("flat", tuple(chw), tuple(a - 1 for a in axes[1:])))
        elif name in _AXIS_MOVES and x.dim() == 4:
            moved = func(torch.empty(_PROBE, device="meta"), *args[1:], **kwargs).shape
            axes = self._axes(x)
            self.tags[id(out)] = (out, ("axes", tuple(axes[_PROBE.index(size)] for size in moved)))
        elif name not in _MIXING:
            for arg in (*args, *kwargs.values()):
                tag = self.tag(arg)
                if tag is not None and arg.shape == out.shape:
                    self.tags[id(out)] = (out, tag)
                    break


def _traced_flatten_orders(module: nn.Module, example_input: Any) -> dict[str, np.ndarray | None]:
    """Readers' permutations seen by running ``module(example_input)`` once (eval mode, no grad)."""
    tracker = _FlattenTracker()
    seen: dict[str, list[tuple]] = {}

    def record(path: str, layer: nn.Module, inputs: tuple) -> None:
        tag = tracker.tag(inputs[0]) if inputs else None
        seen.setdefault(path, []).append(tag[1:] if tag is not None and tag[0] == "flat" else None)

    handles = [layer.register_forward_pre_hook(functools.partial(record, path))
               for path, layer in module.named_modules() if _feature_count(layer) is not None]
    modes = {layer: layer.training for layer in module.modules()}
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    try:
        module.eval()  # eval: BatchNorm must not update its running statistics, dropout is the identity
        with torch.no_grad(), tracker:
            module(*inputs)
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
            raise ValueError(f"{_where(path, module.get_submodule(path))} reads differently flattened inputs "
                             f"in one forward pass ({found}); convert it by hand")
        if found[0] is None:
            orders[path] = None
        else:
            perm = flatten_permutation(*found[0])
            orders[path] = None if np.array_equal(perm, np.arange(perm.size)) else perm
    return orders


# ------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Entry:
    """One PyTorch tensor and its Flax leaf (full path in its collection)."""

    collection: str
    flax_path: tuple[str, ...]
    torch_name: str  # "block1.conv.weight"
    tensor: torch.Tensor
    leaf: _Leaf

    @property
    def key(self) -> tuple[str, ...]:
        return (self.collection, *self.flax_path)


def _show(key: tuple[str, ...]) -> str:
    """("params", "block1", "kernel") -> "params['block1']['kernel']"."""
    return key[0] + "".join(f"[{part!r}]" for part in key[1:])


def _split_flax(path: str) -> tuple[str, ...]:
    if path == "":
        return ()
    parts = tuple(re.split(r"[./]", path))
    if "" in parts:
        raise ValueError(f"name_map value {path!r} has an empty path component")
    return parts


def _prefix_map(module: nn.Module, name_map: NameMap | None) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """name_map as (torch path parts, Flax path parts), longest key first; keys must be module paths."""
    if not name_map:
        return []
    paths = {path for path, _ in module.named_modules()}
    out = []
    for key, value in name_map.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"name_map maps PyTorch module paths to Flax paths, both strings; got "
                             f"{key!r}: {value!r}")
        if key not in paths:
            examples = sorted(p for p in paths if p)[:6]
            raise ValueError(f"name_map key {key!r} is not a module path of {type(module).__name__} "
                             f"(module paths look like {examples})")
        out.append((tuple(key.split(".")) if key else (), _split_flax(value)))
    return sorted(out, key=lambda kv: -len(kv[0]))


def _flax_prefix(path: str, prefixes: list[tuple[tuple[str, ...], tuple[str, ...]]]) -> tuple[str, ...]:
    parts = tuple(path.split(".")) if path else ()
    for key, value in prefixes:  # longest first, so an exact path beats the prefix above it
        if parts[: len(key)] == key:
            return value + parts[len(key):]
    return parts


def _plan(module: nn.Module, example_input: Any, name_map: NameMap | None) -> list[_Entry]:
    """Every convertible tensor of ``module`` with its Flax leaf; raises for anything it cannot convert."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    prefixes = _prefix_map(module, name_map)
    orders: dict[str, Any] = _static_flatten_orders(module)
    if example_input is not None:
        orders.update(_traced_flatten_orders(module, example_input))
    entries: list[_Entry] = []
    for path, layer in module.named_modules():
        rule, owned = _rule(layer), _owned(layer)
        if rule is None:
            if owned:
                raise ValueError(f"{_where(path, layer)} owns {sorted(owned)} itself, and "
                                 f"{type(layer).__name__} is not a layer the converter knows ({_SUPPORTED}; "
                                 f"parameter-free modules are skipped); convert it by hand")
            continue
        if isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) != 1:
            raise ValueError(f"{_where(path, layer)} normalizes over {tuple(layer.normalized_shape)}: only a "
                             f"1-D normalized_shape is converted (which Flax axes a multi-dimensional one is "
                             f"depends on the layout, NCHW vs NHWC); convert it by hand")
        if any(nn.parameter.is_lazy(t) for t in owned.values()):
            raise ValueError(f"{_where(path, layer)} is not initialised yet; run one forward pass first")
        order = orders.get(path)
        if isinstance(order, _Unknown):
            raise ValueError(order.message)
        leaves = rule(layer, order)
        extra = set(owned) - {leaf.attr for leaf in leaves} - _IGNORED_TENSORS
        if extra:
            raise ValueError(f"{_where(path, layer)} owns {sorted(extra)} besides the tensors its layer rule "
                             f"converts ({sorted(leaf.attr for leaf in leaves)}); convert it by hand")
        prefix = _flax_prefix(path, prefixes)
        for leaf in leaves:
            name = f"{path}.{leaf.attr}" if path else leaf.attr
            tensor = getattr(layer, leaf.attr)
            entries.append(_Entry(leaf.collection, (*prefix, leaf.name), name, tensor, leaf))
    _check_distinct(entries)
    return entries


def _check_distinct(entries: list[_Entry]) -> None:
    """No two tensors on one Flax leaf, and no leaf where another tensor needs a subtree."""
    leaves = {}
    for entry in entries:
        if entry.key in leaves:
            raise ValueError(f"{leaves[entry.key]} and {entry.torch_name} both map to {_show(entry.key)}; "
                             f"check name_map")
        leaves[entry.key] = entry.torch_name
    for entry in entries:
        for n in range(2, len(entry.key)):
            if entry.key[:n] in leaves:
                raise ValueError(f"{entry.torch_name} maps below {_show(entry.key[:n])}, which holds "
                                 f"{leaves[entry.key[:n]]}; check name_map")


# ---------------------------------------------------------------------------- export / load


def _numpy(entry: _Entry, value: torch.Tensor) -> np.ndarray:
    try:
        return value.detach().cpu().numpy()
    except TypeError as error:  # bfloat16 and other dtypes NumPy lacks
        raise ValueError(f"{entry.torch_name} ({_show(entry.key)}): {error}; convert the module to a NumPy "
                         f"dtype first (e.g. module.float())") from error


def _export(entries: list[_Entry], collections: tuple[str, ...], grads: bool) -> dict[str, dict]:
    tree: dict[str, dict] = {collection: {} for collection in collections}
    for entry in entries:
        if entry.collection not in collections:
            continue
        value = entry.tensor.grad if grads else entry.tensor
        if value is None:
            raise ValueError(f"{entry.torch_name} has no .grad (for {_show(entry.key)}); run backward() "
                             f"first")
        # A copy in C order: the result never aliases the module's memory.
        array = np.array(entry.leaf.to_flax(_numpy(entry, value)), order="C", copy=True)
        if array.shape != entry.leaf.flax_shape:  # the rule's own invariant; cheap, and names the tensor
            raise ValueError(f"{_show(entry.key)}: expected shape {entry.leaf.flax_shape}, got {array.shape} "
                             f"from {entry.torch_name}")
        node = tree[entry.collection]
        for part in entry.flax_path[:-1]:
            node = node.setdefault(part, {})
        node[entry.flax_path[-1]] = array
    return tree


def _flatten(tree: Any, prefix: tuple[str, ...], out: dict[tuple[str, ...], Any]) -> None:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            _flatten(value, (*prefix, key), out)
    else:
        out[prefix] = tree


def _listing(keys: list[tuple[str, ...]], limit: int = 8) -> str:
    shown = ", ".join(_show(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load(module: nn.Module, entries: list[_Entry], trees: Mapping[str, Any], what: str) -> nn.Module:
    """Check every leaf of ``trees`` ({collection: tree}) against ``entries``, then copy them all in."""
    given: dict[tuple[str, ...], Any] = {}
    for collection, tree in trees.items():
        _flatten(tree, (collection,), given)
    expected = {entry.key: entry for entry in entries if entry.collection in trees}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys(), key=str)
    if missing or unexpected:
        raise ValueError(f"{what}: the tree does not match {type(module).__name__}: "
                         f"missing [{_listing(missing)}]; unexpected [{_listing(unexpected)}]")
    staged: dict[int, tuple[_Entry, torch.Tensor]] = {}  # by tensor id: tied tensors are written once
    for key, entry in expected.items():
        value = np.asarray(given[key])
        # Checked in the Flax layout the caller passed, before any permutation.
        if value.shape != entry.leaf.flax_shape:
            raise ValueError(f"{_show(key)}: expected shape {entry.leaf.flax_shape}, got {value.shape}")
        converted = torch.from_numpy(np.array(entry.leaf.to_torch(value), order="C", copy=True))
        first = staged.get(id(entry.tensor))
        if first is not None and not torch.equal(first[1], converted):
            raise ValueError(f"{_show(first[0].key)} and {_show(key)} load into the same tensor "
                             f"{first[0].torch_name} (tied weights) but hold different values")
        staged[id(entry.tensor)] = (entry, converted)
    with torch.no_grad():  # every check passed: now write (copy_ casts to the tensor's dtype and device)
        for entry, converted in staged.values():
            entry.tensor.copy_(converted)
    return module


def export_flax_params(module: nn.Module, *, grads: bool = False, example_input: Any = None,
                       name_map: NameMap | None = None) -> dict[str, Any]:
    """``module``'s parameters as a Flax ``params`` tree of NumPy arrays (layouts: module docstring).

    Args:
      module: any ``nn.Module`` built from the supported layers.
      grads: export the parameters' ``.grad`` instead, in the same layout, to
        compare with ``jax.grad`` of the Flax twin; a missing ``.grad`` is a
        ``ValueError`` naming the tensor.
      example_input: the module's input (NCHW for images, any batch size), to
        find flattened maps by running the module once; needed only when the
        flatten order cannot be inferred (see "Flatten order").
      name_map: ``{torch module path (prefix): Flax path}`` (see "Names").

    Returns:
      Nested dicts, e.g. ``{"conv1": {"kernel": (kh, kw, I, O), "bias": (O,)}, ...}``,
      with the PyTorch dtype; pass it as ``{"params": ...}`` to the Flax
      model's ``apply``. BatchNorm running statistics are not included (see
      ``export_flax_variables``).
    """
    entries = _plan(module, example_input, name_map)
    return _export(entries, ("params",), grads)["params"]


def load_flax_params(module: nn.Module, params: Mapping, *, example_input: Any = None,
                     name_map: NameMap | None = None) -> nn.Module:
    """Copy a Flax ``params`` tree into ``module`` in place and return ``module``.

    The tree must have exactly the leaves ``export_flax_params(module)`` would
    give, each of the Flax-layout shape (errors name the leaf by full path and
    give the expected and found shapes); nothing is written unless all pass.
    Values are cast to the parameters' dtype, like ``load_state_dict``: call
    ``module.double()`` first to keep float64 exactly. BatchNorm running
    statistics are left as they are (see ``load_flax_variables``).
    ``example_input`` and ``name_map``: as in ``export_flax_params``.
    """
    entries = _plan(module, example_input, name_map)
    if isinstance(params, Mapping):
        top = {key for key in params if key in ("params", "batch_stats", *IGNORED_COLLECTIONS)}
        if top and not any(entry.flax_path[0] in top for entry in entries if entry.collection == "params"):
            raise ValueError(f"load_flax_params: got a variables dict (top-level {sorted(top)}); pass the "
                             f"'params' collection (variables['params']), or call load_flax_variables")
    return _load(module, entries, {"params": params}, "load_flax_params")


def export_flax_variables(module: nn.Module, *, example_input: Any = None,
                          name_map: NameMap | None = None) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` of ``module`` (NumPy), as a Flax ``init`` returns them.

    ``batch_stats`` (BatchNorm ``running_mean``/``running_var`` as ``mean``/``var``)
    is present only when the module has running statistics. The statistics are
    copied as they are: in eval mode PyTorch and Flax
    (``BatchNorm(use_running_average=True)``) use them the same way. Their
    *updates* differ: PyTorch's ``momentum`` m is Flax's ``1 - m``, and
    PyTorch averages the unbiased batch variance where Flax averages the biased
    one. ``example_input`` and ``name_map``: as in ``export_flax_params``.
    """
    entries = _plan(module, example_input, name_map)
    has_stats = any(entry.collection == "batch_stats" for entry in entries)
    return _export(entries, ("params", "batch_stats") if has_stats else ("params",), grads=False)


def load_flax_variables(module: nn.Module, variables: Mapping, *, example_input: Any = None,
                        name_map: NameMap | None = None) -> nn.Module:
    """Copy Flax ``{"params": ..., "batch_stats": ...}`` into ``module`` in place and return it.

    Checked like ``load_flax_params``, over both collections; ``batch_stats``
    is required exactly when the module has running statistics. The
    collections ``perturbations`` and ``intermediates`` (no weights) are
    ignored; any other collection is reported as unexpected.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        found = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"load_flax_variables: expected a variables dict with a 'params' collection, got "
                         f"{found}; for a params tree alone use load_flax_params")
    entries = _plan(module, example_input, name_map)
    trees = {key: value for key, value in variables.items() if key not in IGNORED_COLLECTIONS}
    if "batch_stats" not in trees and any(entry.collection == "batch_stats" for entry in entries):
        trees["batch_stats"] = {}  # reported below as missing leaves, by name
    return _load(module, entries, trees, "load_flax_variables")
