"""Layer rules of the weight converter: how one PyTorch layer's tensors become Flax leaves and back.

Every rule is a pair of pure NumPy functions over *one module*: ``to_flax``
maps ``{tensor name: array}`` (names as in ``module.state_dict()``) to
``{(collection, *path below the module): array}``, and ``to_torch`` is its
exact inverse. Each conversion is a permutation of entries (transposes,
reshapes, splits, flips), so round trips are bit-exact. The table of what
each layer maps to is in ``torch_ref.convert``'s docstring and docs/porting.md.

A layer type the converter does not know gets a rule with ``register_rule``
(see its docstring for a runnable example). Subclasses use their nearest
base's rule; Hugging Face's ``Conv1D`` is recognised by duck typing, so this
module never imports ``transformers``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

__all__ = [
    "conv_kernel_to_flax",
    "conv_kernel_to_torch",
    "flatten_permutation",
    "linear_kernel_to_flax",
    "linear_kernel_to_torch",
    "register_rule",
]

Key = tuple[str, ...]  # (collection, *path below the module), e.g. ("params", "query", "kernel")


# ----------------------------------------------------------------------------- layout helpers


def conv_kernel_to_flax(weight: np.ndarray) -> np.ndarray:
    """(O, I, *k) -> (*k, I, O): any number of spatial axes (Conv1d, Conv2d, Conv3d)."""
    n = weight.ndim
    return np.ascontiguousarray(np.transpose(weight, (*range(2, n), 1, 0)))


def conv_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """(*k, I, O) -> (O, I, *k)."""
    n = kernel.ndim
    return np.ascontiguousarray(np.transpose(kernel, (n - 1, n - 2, *range(n - 2))))


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


def flatten_permutation(feature_shape: Sequence[int], axes: Sequence[int] | None = None) -> np.ndarray:
    """Index ``p`` such that ``flax_vector = torch_vector[p]`` for a flattened channels-first map.

    ``feature_shape`` is the map without its batch axis, channels first:
    (C, L), (C, H, W) or (C, D, H, W). ``torch_vector`` is the map flattened
    with its axes in the order ``axes`` (default ``(0, 1, ..., n-1)``: a plain
    NCHW flatten; ``(1, 2, 0)``: a flatten after ``permute(0, 2, 3, 1)``);
    ``flax_vector`` is the same map flattened channels-last, as Flax does
    ((h, w, c) for images). The inverse is ``np.argsort(p)``.
    """
    n = len(feature_shape)
    axes = tuple(range(n)) if axes is None else tuple(axes)
    index = np.arange(math.prod(feature_shape)).reshape(tuple(feature_shape))  # position in a plain flatten
    torch_order = index.transpose(axes).ravel()  # torch_vector[i] holds plain entry torch_order[i]
    flax_order = index.transpose((*range(1, n), 0)).ravel()  # flax_vector[j] holds plain entry flax_order[j]
    return np.argsort(torch_order)[flax_order]


# ------------------------------------------------------------------------------ conversions


@dataclass(frozen=True)
class Conversion:
    """One module's rule, bound to the module: the tensors it converts and the two directions.

    ``tensors``: names relative to the module ("weight", "out_proj.bias");
    ``to_flax``: ``{name: array} -> {(collection, *path): array}``;
    ``to_torch``: ``{(collection, *path): array} -> {name: array}`` for the
    collections given (a rule returns only the tensors those determine);
    ``subtree``: the rule converts the module's submodules too (they are not
    visited on their own).
    """

    tensors: tuple[str, ...]
    to_flax: Callable[[Mapping[str, np.ndarray]], dict[Key, np.ndarray]]
    to_torch: Callable[[Mapping[Key, np.ndarray]], dict[str, np.ndarray]]
    subtree: bool = False
    sources: Mapping[str, Key] = field(default_factory=dict)  # tensor -> the one leaf it comes from, if so


@dataclass(frozen=True)
class _Leaf:
    """One PyTorch tensor of a layer as one Flax leaf."""

    collection: str  # "params" or "batch_stats"
    name: str  # Flax leaf name: "kernel", "scale", "mean", ...
    attr: str  # PyTorch attribute: "weight", "running_mean", ...
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _from_leaves(leaves: list[_Leaf]) -> Conversion:
    """A Conversion of one-tensor-one-leaf rules (every built-in layer except MultiheadAttention)."""

    def to_flax(tensors: Mapping[str, np.ndarray]) -> dict[Key, np.ndarray]:
        return {(leaf.collection, leaf.name): leaf.to_flax(tensors[leaf.attr]) for leaf in leaves}

    def to_torch(variables: Mapping[Key, np.ndarray]) -> dict[str, np.ndarray]:
        return {leaf.attr: leaf.to_torch(variables[(leaf.collection, leaf.name)])
                for leaf in leaves if (leaf.collection, leaf.name) in variables}

    return Conversion(tuple(leaf.attr for leaf in leaves), to_flax, to_torch,
                      sources={leaf.attr: (leaf.collection, leaf.name) for leaf in leaves})


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _vector_rule(perm: np.ndarray | None) -> tuple[Callable, Callable]:
    """(to_flax, to_torch) of a per-feature vector: permuted when its layer reads a flattened map."""
    if perm is None:
        return _same, _same
    inverse = np.argsort(perm)
    return (lambda v: v[perm]), (lambda v: v[inverse])


def _bias(module: nn.Module, name: str = "bias") -> list[_Leaf]:
    return [_Leaf("params", "bias", name, _same, _same)] if getattr(module, name) is not None else []


# ------------------------------------------------------------------------------ built-in rules


def _conv(conv: nn.modules.conv._ConvNd, perm: None) -> Conversion:
    """Conv1d/2d/3d: weight (O, I/g, *k) -> kernel (*k, I/g, O)."""
    return _from_leaves([_Leaf("params", "kernel", "weight", conv_kernel_to_flax, conv_kernel_to_torch),
                         *_bias(conv)])


def _flip(kernel: np.ndarray) -> np.ndarray:
    return kernel[(slice(None), slice(None), *[slice(None, None, -1)] * (kernel.ndim - 2))]


def _conv_transpose(conv: nn.modules.conv._ConvTransposeNd, perm: None) -> Conversion:
    """ConvTranspose1d/2d/3d: weight (I, O, *k) -> Flax ``nn.ConvTranspose`` kernel (*k, I, O), flipped.

    PyTorch's transposed convolution is the gradient of a convolution, which
    flips the kernel in space; Flax's ``nn.ConvTranspose`` (``transpose_kernel=False``,
    its default) does not flip, so the flip is in the weights.
    """
    if conv.groups != 1:
        raise ValueError(f"has groups={conv.groups}: Flax's nn.ConvTranspose has no feature groups; "
                         f"convert it by hand")

    def to_flax(w: np.ndarray) -> np.ndarray:  # (I, O, *k) -> (*k, I, O)
        n = w.ndim
        return np.ascontiguousarray(np.transpose(_flip(w), (*range(2, n), 0, 1)))

    def to_torch(k: np.ndarray) -> np.ndarray:  # (*k, I, O) -> (I, O, *k)
        n = k.ndim
        return np.ascontiguousarray(_flip(np.transpose(k, (n - 2, n - 1, *range(n - 2)))))

    return _from_leaves([_Leaf("params", "kernel", "weight", to_flax, to_torch), *_bias(conv)])


def _linear(linear: nn.Linear, perm: np.ndarray | None) -> Conversion:
    """Linear: weight (O, I) -> kernel (I, O), rows permuted if it reads a flattened map."""
    if perm is None:
        to_flax, to_torch = (lambda w: w.T), (lambda k: k.T)
    else:  # Flax kernel row j reads flax_vector[j] = torch_vector[perm[j]]
        inverse = np.argsort(perm)
        to_flax, to_torch = (lambda w: w.T[perm]), (lambda k: k[inverse].T)
    return _from_leaves([_Leaf("params", "kernel", "weight", to_flax, to_torch), *_bias(linear)])


def _hf_conv1d(conv: nn.Module, perm: np.ndarray | None) -> Conversion:
    """Hugging Face ``Conv1D`` (GPT-2): weight (I, O), y = x @ W + b -> ``FlaxConv1D`` kernel (O, I).

    ``transformers``' own converter transposes it like a Linear weight, and its
    ``FlaxConv1D`` stores (features, in) and multiplies by the transpose.
    """
    if perm is None:
        to_flax, to_torch = (lambda w: w.T), (lambda k: k.T)
    else:  # the input features are axis 0 of the weight, axis 1 of the kernel
        inverse = np.argsort(perm)
        to_flax, to_torch = (lambda w: w[perm].T), (lambda k: k.T[inverse])
    return _from_leaves([_Leaf("params", "kernel", "weight", to_flax, to_torch), *_bias(conv)])


def _batch_norm(bn: nn.modules.batchnorm._BatchNorm, perm: np.ndarray | None) -> Conversion:
    to_flax, to_torch = _vector_rule(perm)
    leaves = []
    if bn.affine:
        leaves += [_Leaf("params", "scale", "weight", to_flax, to_torch),
                   _Leaf("params", "bias", "bias", to_flax, to_torch)]
    if bn.track_running_stats:
        leaves += [_Leaf("batch_stats", "mean", "running_mean", to_flax, to_torch),
                   _Leaf("batch_stats", "var", "running_var", to_flax, to_torch)]
    return _from_leaves(leaves)


def _layer_norm(ln: nn.LayerNorm, perm: np.ndarray | None) -> Conversion:
    if len(ln.normalized_shape) != 1:
        raise ValueError(f"normalizes over {tuple(ln.normalized_shape)}: only a 1-D normalized_shape "
                         f"is converted (which Flax axes a multi-dimensional one is depends on the layout, "
                         f"NCHW vs NHWC); convert it by hand")
    to_flax, to_torch = _vector_rule(perm)
    leaves = []
    if ln.weight is not None:
        leaves.append(_Leaf("params", "scale", "weight", to_flax, to_torch))
    if ln.bias is not None:
        leaves.append(_Leaf("params", "bias", "bias", to_flax, to_torch))
    return _from_leaves(leaves)


def _group_norm(gn: nn.GroupNorm, perm: None) -> Conversion:
    if not gn.affine:
        return _from_leaves([])
    return _from_leaves([_Leaf("params", "scale", "weight", _same, _same),
                         _Leaf("params", "bias", "bias", _same, _same)])


def _embedding(emb: nn.Embedding, perm: None) -> Conversion:
    return _from_leaves([_Leaf("params", "embedding", "weight", _same, _same)])


def _multihead_attention(mha: nn.MultiheadAttention, perm: None) -> Conversion:
    """``nn.MultiheadAttention`` -> ``flax.linen.MultiHeadDotProductAttention`` (H heads of size D, E = H*D).

    q/k/v projection (E, E_in) (rows of ``in_proj_weight`` or ``q/k/v_proj_weight``)
    -> ``query``/``key``/``value`` kernel (E_in, H, D), bias (H, D);
    ``out_proj`` weight (E_out, E) -> ``out`` kernel (H, D, E_out), bias (E_out,).
    PyTorch splits a projection's E outputs into heads as (h, d), as Flax's
    DenseGeneral does, so each kernel is a transpose and a reshape.
    """
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    packed = mha.in_proj_weight is not None
    has_bias = mha.in_proj_bias is not None
    names = ("query", "key", "value")
    weights = ("in_proj_weight",) if packed else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    tensors = [*weights, "out_proj.weight"]
    if has_bias:
        tensors += ["in_proj_bias"]
    if mha.out_proj.bias is not None:
        tensors += ["out_proj.bias"]

    def to_flax(t: Mapping[str, np.ndarray]) -> dict[Key, np.ndarray]:
        ws = np.split(t["in_proj_weight"], 3) if packed else [t[w] for w in weights]  # 3 x (E, E_in)
        out: dict[Key, np.ndarray] = {}
        for i, name in enumerate(names):
            out["params", name, "kernel"] = ws[i].T.reshape(ws[i].shape[1], h, d)  # (E_in, H, D)
            if has_bias:
                out["params", name, "bias"] = t["in_proj_bias"][i * e:(i + 1) * e].reshape(h, d)
        wo = t["out_proj.weight"]  # (E_out, E)
        out["params", "out", "kernel"] = wo.T.reshape(h, d, wo.shape[0])  # (H, D, E_out)
        if "out_proj.bias" in t:
            out["params", "out", "bias"] = t["out_proj.bias"]
        return out

    def to_torch(v: Mapping[Key, np.ndarray]) -> dict[str, np.ndarray]:
        if ("params", "out", "kernel") not in v:
            return {}
        ws = [v["params", name, "kernel"] for name in names]
        ws = [k.reshape(k.shape[0], e).T for k in ws]  # (E, E_in)
        out = {"in_proj_weight": np.concatenate(ws)} if packed else dict(zip(weights, ws, strict=True))
        if has_bias:
            out["in_proj_bias"] = np.concatenate([v["params", name, "bias"].reshape(e) for name in names])
        ko = v["params", "out", "kernel"]  # (H, D, E_out)
        out["out_proj.weight"] = ko.reshape(e, ko.shape[-1]).T
        if ("params", "out", "bias") in v:
            out["out_proj.bias"] = v["params", "out", "bias"]
        return out

    return Conversion(tuple(tensors), to_flax, to_torch, subtree=True)


#: ``rule(module, flatten permutation or None) -> Conversion``. A rule refuses a module it cannot convert
#: with a ``ValueError`` whose message starts with a verb ("has groups=2: ..."): the caller puts the
#: module's path in front.
Rule = Callable[[Any, Any], Conversion]

#: Layer type -> rule. Subclasses use their nearest base's rule.
_RULES: dict[type, Rule] = {
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.ConvTranspose1d: _conv_transpose,
    nn.ConvTranspose2d: _conv_transpose,
    nn.ConvTranspose3d: _conv_transpose,
    nn.Linear: _linear,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.Embedding: _embedding,
    nn.MultiheadAttention: _multihead_attention,
}
#: Rules registered with ``register_rule``; they take precedence over the built-in ones.
_USER_RULES: dict[type, Rule] = {}


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's transposed Linear), by duck typing."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and weight is not None
            and weight.dim() == 2 and weight.shape[1] == module.nf)


def supported_names() -> str:
    return ", ".join([*(cls.__name__ for cls in _RULES), "transformers' Conv1D"])


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of ``module``'s type (a registered one first, then the nearest built-in base), or None."""
    user = next((_USER_RULES[cls] for cls in type(module).__mro__ if cls in _USER_RULES), None)
    if user is not None:
        return user
    if is_hf_conv1d(module):
        return _hf_conv1d
    return next((_RULES[cls] for cls in type(module).__mro__ if cls in _RULES), None)


# ------------------------------------------------------------------------------ user rules


ToFlax = Callable[[nn.Module, dict[str, np.ndarray]], Mapping[str, Any]]
ToTorch = Callable[[nn.Module, dict[str, Any]], Mapping[str, np.ndarray]]


def _flatten(tree: Mapping, prefix: Key = ()) -> dict[Key, Any]:
    out: dict[Key, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _unflatten(flat: Mapping[Key, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return tree


def register_rule(module_type: type[nn.Module], to_flax: ToFlax, to_torch: ToTorch) -> None:
    """Teach the converter a layer type: how its tensors become Flax leaves, and back.

    The rule converts a module of ``module_type`` (or a subclass) *and its
    submodules*; it replaces any rule the converter had for that type.

    * ``to_flax(module, tensors) -> variables``: ``tensors`` holds every
      persistent tensor of the module and its submodules as NumPy arrays,
      named as in ``module.state_dict()`` (``"weight"``, ``"proj.bias"``); for
      ``export_flax_params(grads=True)`` the parameters hold their ``.grad``.
      ``variables`` is ``{collection: nested dict of arrays}`` below the
      module's Flax path, e.g. ``{"params": {"kernel": k, "bias": b}}``.
    * ``to_torch(module, variables) -> tensors``: the exact inverse, given the
      collections being loaded (``load_flax_params``: ``"params"`` only); it
      returns the tensors those determine, by name; the others stay as they are.

    The converter checks every shape both ways (the expected Flax shapes are
    those of ``to_flax`` on the module's own tensors) and casts to the
    module's dtypes. Rules are process-wide, like ``copyreg``. Example: a
    layer storing a (out, in) weight whose Flax twin is ``nn.Dense`` ((in, out)
    ``kernel``); without the rule its parameters would be copied as they are,
    under their own names::

        import numpy as np
        import torch
        from torch import nn

        import torch_ref

        class MyLinear(nn.Module):  # y = x @ weight.T + shift
            def __init__(self, n_in, n_out):
                super().__init__()
                self.weight = nn.Parameter(torch.randn(n_out, n_in))
                self.shift = nn.Parameter(torch.zeros(n_out))

        torch_ref.register_rule(
            MyLinear,
            to_flax=lambda m, t: {"params": {"kernel": t["weight"].T, "bias": t["shift"]}},
            to_torch=lambda m, v: {"weight": v["params"]["kernel"].T, "shift": v["params"]["bias"]})
        params = torch_ref.export_flax_params(nn.Sequential(MyLinear(3, 2)))
        assert params["0"]["kernel"].shape == (3, 2)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_rule: module_type must be a torch.nn.Module subclass, got {module_type!r}")
    if not (callable(to_flax) and callable(to_torch)):
        raise TypeError("register_rule: to_flax and to_torch must be callables "
                        "(to_flax(module, tensors) -> variables, to_torch(module, variables) -> tensors)")

    def rule(module: nn.Module, perm: Any) -> Conversion:
        names = tuple(module.state_dict(keep_vars=True))

        def flax_side(tensors: Mapping[str, np.ndarray]) -> dict[Key, np.ndarray]:
            variables = to_flax(module, dict(tensors))
            if not isinstance(variables, Mapping):
                raise TypeError(f"the to_flax rule of {module_type.__name__} returned "
                                f"{type(variables).__name__}; expected {{collection: nested dict of arrays}}")
            return {key: np.asarray(value) for key, value in _flatten(variables).items()}

        def torch_side(variables: Mapping[Key, np.ndarray]) -> dict[str, np.ndarray]:
            tensors = to_torch(module, _unflatten(variables))
            if not isinstance(tensors, Mapping):
                raise TypeError(f"the to_torch rule of {module_type.__name__} returned "
                                f"{type(tensors).__name__}; expected {{tensor name: array}}")
            return {name: np.asarray(value) for name, value in tensors.items()}

        return Conversion(names, flax_side, torch_side, subtree=True)

    _USER_RULES[module_type] = rule
