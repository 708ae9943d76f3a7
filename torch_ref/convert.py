"""Weight conversion between PyTorch module trees and Flax variable trees.

One converter for any ``nn.Module`` built from the layers below, including
Hugging Face models whose Flax twin ships with ``transformers``. It speaks
NumPy on the Flax side (nested dicts of arrays, the layout of a Flax model's
``variables``) so that it never imports JAX::

    params = torch_ref.export_flax_params(torch_model)              # {"conv1": {"kernel": ...}, ...}
    logits = flax_model.apply({"params": jax.tree.map(jnp.asarray, params)}, x_nhwc)
    torch_ref.load_flax_params(torch_model, jax.tree.map(np.asarray, flax_params))

This module exports and loads; the walk over the module tree and the checks of
a tree against it are ``torch_ref.convert_plan``'s, the layer rules
``convert_rules``', the Flax paths ``convert_names``' and the flatten order
``convert_flatten``'s. The guide, with runnable examples: docs/porting.md,
"Moving weights: the converter".

Layer rules (``torch_ref.convert_rules``; ``I/g`` is ``in_channels / groups``,
``*k`` the kernel's spatial size, E = H*D for H heads of size D):

==========================  ==================================  ====================================
PyTorch layer               PyTorch tensor                      Flax leaf
==========================  ==================================  ====================================
``Conv1d/2d/3d``            weight (O, I/g, *k)                 params kernel (*k, I/g, O)
``ConvTranspose1d/2d/3d``   weight (I, O, *k)                   params kernel (*k, I, O), flipped in
                                                                space (``nn.ConvTranspose``)
``Linear``                  weight (O, I)                       params kernel (I, O), rows permuted
                                                                if it reads a flattened map (below)
HF ``Conv1D`` (GPT-2)       weight (I, O)                       params kernel (O, I) (``FlaxConv1D``)
``BatchNorm1d/2d/3d``       weight, bias (F,)                   params scale, bias (F,)
                            running_mean, running_var (F,)      batch_stats mean, var (F,)
``LayerNorm``/``GroupNorm``  weight, bias (F,)                   params scale, bias (F,)
``Embedding``               weight (N, D)                       params embedding (N, D)
``MultiheadAttention``      in_proj_weight (3E, E_in)           params query/key/value kernel
                                                                (E_in, H, D), bias (H, D)
                            out_proj weight (E_out, E)          params out kernel (H, D, E_out)
other parameters            ``cls_token`` (any shape)           params ``cls_token``, unchanged
==========================  ==================================  ====================================

Every bias (O,) is params ``bias`` (O,). A missing tensor gives a missing
leaf (``bias=False``, BatchNorm ``affine=False`` or ``track_running_stats=False``).
BatchNorm's ``num_batches_tracked`` and non-persistent buffers (those
``state_dict()`` leaves out, such as BERT's ``position_ids``) are not
weights: neither exported nor loaded. Hyper-parameters (stride, padding,
dilation, groups, eps, heads) are not weights: the Flax model states its own.
Refused with an error naming the module: a multi-dimensional LayerNorm, a
grouped ConvTranspose, MultiheadAttention's ``add_bias_kv``, and any other
``torch.nn`` layer (RNNs, ``Bilinear``, ...). ``Embedding(padding_idx=i)``
warns (``PaddingIdxWarning``): PyTorch gives row i no gradient, Flax's
``nn.Embed`` does.

**Parameters outside the layers above** (``cls_token`` and ``pos_embed`` on a
ViT, an ``nn.Parameter`` set on your own module) are copied as they are, under
their own name in ``params``; a persistent buffer there is an error.
``torch_ref.register_rule`` teaches the converter any other layer type.

**Names.** By default the PyTorch module path ``block1.conv`` is the Flax path
``{"block1": {"conv": ...}}``: a Hugging Face Flax twin uses the PyTorch names,
so nothing else is needed. ``name_map`` renames: its keys are PyTorch module
paths and act as *prefixes* of whole path components, the longest matching key
wins (an exact path beats the prefix above it), and the rest of the path is
kept. Values are Flax paths written with ``/`` or ``.``; ``""`` means the root.
``{"features": "backbone", "features.0": "conv1"}`` maps ``features.0`` ->
``conv1``, ``features.3`` -> ``backbone/3`` and ``features.3.bn`` ->
``backbone/3/bn``; ``"features"`` does not match ``features2``.

A *target* tree (the Flax model's own ``params``/``variables``, arrays or
``jax.ShapeDtypeStruct``; when loading, the tree being loaded) settles two
things names alone cannot: a numbered child ``layer.0`` may be Flax's
list-attribute name ``layer_0`` (a list of submodules assigned in ``setup``),
and a tensor tied to another one (GPT-2's ``lm_head.weight``, which *is*
``wte.weight``) may be held once. With a target, each leaf takes whichever
spelling the target has, and a module whose tensors are all tied to others and
which the target lacks is left out. Export also checks the result against the
target, leaf for leaf and shape for shape.

**Flatten order.** PyTorch flattens a (B, C, H, W) map as (c, h, w), Flax a
(B, H, W, C) map as (h, w, c) (likewise (c, l) vs (l, c) after a Conv1d and
(c, d, h, w) vs (d, h, w, c) after a Conv3d). A layer that reads such a
flattened map (``Linear``, HF ``Conv1D``, and ``BatchNorm1d`` or ``LayerNorm``
over the flattened features) has its feature axis permuted, not only
transposed (``flatten_permutation``). Which layers do is found by running the
module once on ``example_input`` (any batch size; a tuple is positional
inputs, a dict keyword inputs) and following every flatten of a map to the
layer that reads it, or without it from the order the modules were
registered in: a reader with F features right after a convolution with C
channels and r spatial axes reads a (C, s, ..., s) map when F = C * s**r, and
a non-square map asks for ``example_input`` (``torch_ref.convert_flatten``).

**Checks.** Every shape is checked before anything is written: an error names
the tensor by its full Flax path (``params['block1']['conv']['kernel']``) with
the expected and found shapes in the caller's layout (Flax layout when
loading), missing and unexpected leaves are listed by full path, and nothing in
the module changes when a check fails. Loaded values are cast to the module's
dtype (like ``load_state_dict``; ``bfloat16`` arrays too, exactly); a complex
array into a real tensor is an error. Every conversion is a permutation of
entries, so round trips are bit-exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from torch_ref.convert_names import NameMap, show
from torch_ref.convert_plan import Group, PaddingIdxWarning, fit, flatten_trees, match, plan
from torch_ref.convert_rules import (
    Key,
    conv_kernel_to_flax,
    conv_kernel_to_torch,
    flatten_permutation,
    linear_kernel_to_flax,
    linear_kernel_to_torch,
    register_rule,
)

__all__ = [
    "PaddingIdxWarning",
    "conv_kernel_to_flax",
    "conv_kernel_to_torch",
    "export_flax_params",
    "export_flax_variables",
    "flatten_permutation",
    "linear_kernel_to_flax",
    "linear_kernel_to_torch",
    "load_flax_params",
    "load_flax_variables",
    "register_rule",
]

#: Collections a Flax ``init`` may return that hold no weights; ``load_flax_variables`` ignores them.
IGNORED_COLLECTIONS = ("perturbations", "intermediates")


# ---------------------------------------------------------------------------- export / load


def _numpy(group: Group, name: str, value: torch.Tensor) -> np.ndarray:
    try:
        return value.detach().cpu().numpy()
    except TypeError as error:  # bfloat16 and other dtypes NumPy lacks
        raise ValueError(f"{group.torch_name(name)} ({group.where()}): {error}; convert the module to a "
                         f"NumPy dtype first (e.g. module.float())") from error


def _export(groups: list[Group], collections: tuple[str, ...], grads: bool) -> dict[str, dict]:
    tree: dict[str, dict] = {collection: {} for collection in collections}
    for group in groups:
        if not any(key[0] in collections for key in group.keys.values()):
            continue
        values = {}
        for name, tensor in group.tensors.items():
            value = tensor.grad if grads and isinstance(tensor, nn.Parameter) else tensor
            if value is None:
                rel = group.conversion.sources.get(name)
                leaf = show(group.keys[rel]) if rel in group.keys else group.where()
                raise ValueError(f"{group.torch_name(name)} has no .grad (for {leaf}); run backward() first")
            values[name] = _numpy(group, name, value)
        for rel, array in group.conversion.to_flax(values).items():
            key = group.keys.get(rel)
            if key is None or key[0] not in collections:
                continue
            # A copy in C order: the result never aliases the module's memory.
            array = np.array(array, order="C", copy=True)
            if array.shape != group.shapes[rel]:  # the rule's own invariant; cheap, and names the leaf
                raise ValueError(f"{show(key)}: expected shape {group.shapes[rel]}, got {array.shape} from "
                                 f"{group.where()}")
            node = tree[key[0]]
            for part in key[1:-1]:
                node = node.setdefault(part, {})
            node[key[-1]] = array
    return tree


def _numeric(key: Key, value: Any) -> np.ndarray:
    """A given leaf as a NumPy array PyTorch can take; bfloat16 (and float8) widen to float32 exactly."""
    array = np.asarray(value)
    if array.dtype.kind == "V" and ("bfloat16" in array.dtype.name or "float8" in array.dtype.name):
        return array.astype(np.float32)  # every bfloat16/float8 value is a float32 value
    if array.dtype.kind not in "biufc":
        raise TypeError(f"{show(key)}: expected a numeric array, got dtype {array.dtype}")
    return array


def _load(module: nn.Module, groups: list[Group], trees: Mapping[str, Any], what: str) -> nn.Module:
    """Check every leaf of ``trees`` ({collection: tree}) against ``groups``, then copy them all in."""
    given = flatten_trees(trees)
    groups = fit(groups, set(given))
    match(groups, given, tuple(trees), what, module)  # in the Flax layout the caller passed
    staged: dict[int, tuple[str, str, torch.Tensor, torch.Tensor]] = {}  # by tensor id: tied written once
    for group in groups:
        leaves = {rel: _numeric(key, given[key]) for rel, key in group.keys.items() if key in given}
        if not leaves:
            continue
        for name, array in group.conversion.to_torch(leaves).items():
            tensor = group.tensors.get(name)
            label = group.torch_name(name)
            if tensor is None:
                raise ValueError(f"the rule of {group.where()} returned {name!r}, which is not one of its "
                                 f"tensors {sorted(group.tensors)}")
            if tuple(array.shape) != tuple(tensor.shape):
                raise ValueError(f"the rule of {group.where()} gives {label} the shape {tuple(array.shape)}, "
                                 f"expected {tuple(tensor.shape)}")
            if np.iscomplexobj(array) and not tensor.is_complex():
                leaf = _leaf_label(group, name)
                raise ValueError(f"{leaf} is complex ({array.dtype}) but {label} is {tensor.dtype}: loading "
                                 f"would drop the imaginary part; pass np.real(...) if that is meant")
            converted = torch.from_numpy(np.array(array, order="C", copy=True))
            first = staged.get(id(tensor))
            if first is not None and not torch.equal(first[3], converted):
                raise ValueError(f"{first[0]} and {_leaf_label(group, name)} load into the same tensor "
                                 f"{first[1]} (tied weights) but hold different values")
            if first is None:
                staged[id(tensor)] = (_leaf_label(group, name), label, tensor, converted)
    with torch.no_grad():  # every check passed: now write (copy_ casts to the tensor's dtype and device)
        for _, _, tensor, converted in staged.values():
            tensor.copy_(converted)
    return module


def _leaf_label(group: Group, name: str) -> str:
    rel = group.conversion.sources.get(name)
    return show(group.keys[rel]) if rel in group.keys else f"the leaves of {group.where()}"


def _target_keys(target: Mapping, collections: tuple[str, ...]) -> dict[Key, Any]:
    """A target tree's leaves by full key; a bare params tree is read as ``{"params": target}``."""
    if not isinstance(target, Mapping):
        raise TypeError(f"target: expected the Flax model's params or variables (nested dicts), got "
                        f"{type(target).__name__}")
    if "params" not in target:
        return flatten_trees({"params": target})
    trees = {k: v for k, v in target.items() if k in collections}
    return flatten_trees(trees)


def _export_to(module: nn.Module, groups: list[Group], collections: tuple[str, ...], grads: bool,
               target: Mapping | None, what: str) -> dict[str, dict]:
    if target is not None:
        wanted = _target_keys(target, collections)
        groups = fit(groups, set(wanted))
        collections = tuple(c for c in collections if any(k[0] == c for k in wanted)) or ("params",)
        match(groups, wanted, collections, what, module)
    return _export(groups, collections, grads)


def export_flax_params(module: nn.Module, *, grads: bool = False, example_input: Any = None,
                       name_map: NameMap | None = None, target: Mapping | None = None) -> dict[str, Any]:
    """``module``'s parameters as a Flax ``params`` tree of NumPy arrays (layouts: module docstring).

    Args:
      module: any ``nn.Module`` built from the supported layers.
      grads: export the parameters' ``.grad`` instead, in the same layout, to
        compare with ``jax.grad`` of the Flax twin; a missing ``.grad`` is a
        ``ValueError`` naming the tensor.
      example_input: the module's input (NCHW for images, any batch size; a
        tuple for positional inputs, a dict for keyword inputs), to find
        flattened maps by running the module once; needed only when the
        flatten order cannot be inferred (see "Flatten order").
      name_map: ``{torch module path (prefix): Flax path}`` (see "Names").
      target: the Flax twin's params (or variables), arrays or shapes: leaves
        are spelled as it spells them (``layer_0`` for ``layer.0``), tied
        duplicates it lacks are left out, and the result must match it leaf
        for leaf (see "Names").

    Returns:
      Nested dicts, e.g. ``{"conv1": {"kernel": (kh, kw, I, O), "bias": (O,)}, ...}``,
      with the PyTorch dtype; pass it as ``{"params": ...}`` to the Flax
      model's ``apply``. BatchNorm running statistics are not included (see
      ``export_flax_variables``).
    """
    groups = plan(module, example_input, name_map)
    return _export_to(module, groups, ("params",), grads, target, "export_flax_params")["params"]


def load_flax_params(module: nn.Module, params: Mapping, *, example_input: Any = None,
                     name_map: NameMap | None = None) -> nn.Module:
    """Copy a Flax ``params`` tree into ``module`` in place and return ``module``.

    The tree must have exactly the leaves ``export_flax_params(module,
    target=params)`` would give, each of the Flax-layout shape (errors name the
    leaf by full path and give the expected and found shapes); nothing is
    written unless all pass. Values are cast to the parameters' dtype, like
    ``load_state_dict`` (``bfloat16`` leaves too, exactly): call
    ``module.double()`` first to keep float64 exactly; a complex leaf into a
    real tensor is an error. BatchNorm running statistics are left as they are
    (see ``load_flax_variables``). ``example_input`` and ``name_map``: as in
    ``export_flax_params``.
    """
    groups = plan(module, example_input, name_map)
    if isinstance(params, Mapping):
        top = {key for key in params if key in ("params", "batch_stats", *IGNORED_COLLECTIONS)}
        if top and not any(key[1] in top for group in groups for key in group.keys.values()
                           if key[0] == "params"):
            raise ValueError(f"load_flax_params: got a variables dict (top-level {sorted(top)}); pass the "
                             f"'params' collection (variables['params']), or call load_flax_variables")
    return _load(module, groups, {"params": params}, "load_flax_params")


def export_flax_variables(module: nn.Module, *, example_input: Any = None, name_map: NameMap | None = None,
                          target: Mapping | None = None) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` of ``module`` (NumPy), as a Flax ``init`` returns them.

    ``batch_stats`` (BatchNorm ``running_mean``/``running_var`` as ``mean``/``var``)
    is present only when the module has running statistics. The statistics are
    copied as they are: in eval mode PyTorch and Flax
    (``BatchNorm(use_running_average=True)``) use them the same way. Their
    *updates* differ: PyTorch's ``momentum`` m is Flax's ``1 - m``, and
    PyTorch averages the unbiased batch variance where Flax averages the biased
    one. ``example_input``, ``name_map`` and ``target`` (here the Flax
    variables): as in ``export_flax_params``.
    """
    groups = plan(module, example_input, name_map)
    has_stats = any(key[0] == "batch_stats" for group in groups for key in group.keys.values())
    collections = ("params", "batch_stats") if has_stats else ("params",)
    return _export_to(module, groups, collections, False, target, "export_flax_variables")


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
    groups = plan(module, example_input, name_map)
    trees = {key: value for key, value in variables.items() if key not in IGNORED_COLLECTIONS}
    if "batch_stats" not in trees and any(key[0] == "batch_stats" for g in groups for key in g.keys.values()):
        trees["batch_stats"] = {}  # reported below as missing leaves, by name
    return _load(module, groups, trees, "load_flax_variables")

