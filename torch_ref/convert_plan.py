"""The weight converter's plan: every convertible module, its tensors and the Flax leaves they become.

``plan`` walks a module tree once (``named_modules``, ``state_dict`` for which
buffers persist) and gives one ``Group`` per module that has something to
convert: its layer rule's ``Conversion`` (``torch_ref.convert_rules``) or its
bare parameters, the Flax shape of every leaf, and the full Flax key of every
leaf (``torch_ref.convert_names``). ``fit`` respells those keys as a target
tree does, and ``match`` checks a given tree against them, leaf for leaf and
shape for shape. Nothing here reads or writes a tensor's values; the export
and the load are ``torch_ref.convert``'s.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from torch_ref.convert_flatten import Unknown, static_flatten_orders, traced_flatten_orders, where
from torch_ref.convert_names import NameMap, children_of, flax_prefix, listing, prefix_map, respell, show
from torch_ref.convert_rules import Conversion, Key, rule_for, supported_names

#: Tensors a known layer owns that have no Flax counterpart.
_IGNORED_TENSORS = {"num_batches_tracked"}
#: Module types that only group others: a parameter on one of them is a bare parameter, not a layer's.
_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)


class PaddingIdxWarning(UserWarning):
    """An ``Embedding(padding_idx=i)`` converted: PyTorch never updates row i; Flax's ``nn.Embed`` does."""


@dataclass(eq=False)
class Group:
    """One module's conversion, placed in the Flax tree."""

    path: str  # PyTorch module path, "" for the root
    module: nn.Module
    conversion: Conversion
    tensors: dict[str, torch.Tensor]  # by name relative to the module ("weight", "out_proj.bias")
    shapes: dict[Key, tuple[int, ...]]  # Flax shape by (collection, *path below the module)
    keys: dict[Key, Key] = field(default_factory=dict)  # (collection, *below) -> (collection, *full path)

    def torch_name(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def where(self) -> str:
        return where(self.path, self.module)


def _bare(names: tuple[str, ...]) -> Conversion:
    """Parameters no rule covers: the same array under the same name in ``params``."""
    return Conversion(names, lambda t: {("params", n): t[n] for n in names},
                      lambda v: {n: v["params", n] for n in names if ("params", n) in v},
                      sources={n: ("params", n) for n in names})


def _conversion(path: str, layer: nn.Module, own: dict[str, torch.Tensor], buffers: set[str],
                order: Any) -> Conversion | None:
    """The module's Conversion (a rule's, or its bare parameters'), None if it has nothing to convert."""
    rule = rule_for(layer)
    if rule is None:
        if not own:
            return None
        if type(layer).__module__.startswith("torch.") and type(layer) not in _CONTAINERS:
            raise ValueError(f"{where(path, layer)} owns {sorted(own)} itself, and {type(layer).__name__} is "
                             f"not a layer the converter knows ({supported_names()}; parameter-free modules "
                             f"are skipped); convert it by hand or add a rule with torch_ref.register_rule")
        if own.keys() & buffers:
            found = sorted(own.keys() & buffers)
            raise ValueError(f"{where(path, layer)} owns the persistent buffers {found}, "
                             f"which belong to no Flax collection the converter knows; add a rule with "
                             f"torch_ref.register_rule")
        return _bare(tuple(own))
    if any(nn.parameter.is_lazy(t) for t in own.values()):
        raise ValueError(f"{where(path, layer)} is not initialised yet; run one forward pass first")
    if isinstance(order, Unknown):
        raise ValueError(order.message)
    try:
        conversion = rule(layer, order)
    except ValueError as error:
        raise ValueError(f"{where(path, layer)} {error}") from error
    extra = set(own) - set(conversion.tensors) - _IGNORED_TENSORS
    if extra:
        raise ValueError(f"{where(path, layer)} owns {sorted(extra)} besides the tensors its layer rule "
                         f"converts ({sorted(conversion.tensors)}); convert it by hand or add a rule with "
                         f"torch_ref.register_rule")
    return conversion


def _flax_shapes(conversion: Conversion, tensors: Mapping[str, torch.Tensor]) -> dict[Key, tuple[int, ...]]:
    """The Flax shapes of a conversion: its ``to_flax`` on zeros of the tensors' shapes (no values read)."""
    zeros = {name: np.zeros(tuple(t.shape), np.float32) for name, t in tensors.items()}
    return {key: tuple(np.shape(value)) for key, value in conversion.to_flax(zeros).items()}


def plan(module: nn.Module, example_input: Any, name_map: NameMap | None) -> list[Group]:
    """Every convertible module with its tensors and Flax leaves; raises for anything it cannot convert."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    prefixes = prefix_map(module, name_map)
    persistent = set(module.state_dict(keep_vars=True))  # public: non-persistent buffers are not in it
    orders: dict[str, Any] = static_flatten_orders(module)
    if example_input is not None:
        orders.update(traced_flatten_orders(module, example_input))
    groups: list[Group] = []
    covered: list[str] = []  # paths of modules whose rule converts their submodules too
    padding: list[str] = []
    for path, layer in module.named_modules():
        if any(path == c or path.startswith(c + ".") or c == "" for c in covered):
            continue
        name = (path + ".") if path else ""
        own = dict(layer.named_parameters(recurse=False))
        buffers = {n for n, _ in layer.named_buffers(recurse=False) if name + n in persistent}
        own.update((n, b) for n, b in layer.named_buffers(recurse=False) if n in buffers)
        conversion = _conversion(path, layer, own, buffers, orders.get(path))
        if conversion is None:
            continue
        if conversion.subtree:
            covered.append(path)
        available = layer.state_dict(keep_vars=True) if conversion.subtree else own
        tensors = {n: available[n] for n in conversion.tensors}
        if isinstance(layer, nn.Embedding) and layer.padding_idx is not None:
            padding.append(f"{path!r} (row {layer.padding_idx})")
        group = Group(path, layer, conversion, tensors, _flax_shapes(conversion, tensors))
        prefix = flax_prefix(path, prefixes)
        group.keys = {key: (key[0], *prefix, *key[1:]) for key in group.shapes}
        if group.keys:
            groups.append(group)
    if padding:
        warnings.warn(f"Embedding padding_idx at {', '.join(padding)}: PyTorch gives that row no gradient, "
                      f"Flax's nn.Embed trains it; zero that row of the Flax gradient (g.at[i].set(0)) or "
                      f"construct the Embedding without padding_idx", PaddingIdxWarning, stacklevel=3)
    _check_distinct(groups)
    return groups


def fit(groups: list[Group], target: set[Key]) -> list[Group]:
    """Spell every leaf as ``target`` does; leave out tied duplicates the target does not hold."""
    children = children_of(target)
    for group in groups:
        group.keys = {rel: respell(full, target, children) for rel, full in group.keys.items()}
    present = {id(g) for g in groups if any(full in target for full in g.keys.values())}
    held = {id(t) for g in groups if id(g) in present for t in g.tensors.values()}
    # A module the target lacks whose every tensor is another's (tied) that the target holds: left out.
    kept = [g for g in groups if id(g) in present or not all(id(t) in held for t in g.tensors.values())]
    _check_distinct(kept)
    return kept


def _check_distinct(groups: list[Group]) -> None:
    """No two tensors on one Flax leaf, and no leaf where another tensor needs a subtree."""
    leaves: dict[Key, str] = {}
    for group in groups:
        for rel, key in group.keys.items():
            source = next((n for n, r in group.conversion.sources.items() if r == rel), None)
            label = group.torch_name(source) if source else f"{group.path or 'the root'} ({show(rel)})"
            if key in leaves:
                raise ValueError(f"{leaves[key]} and {label} both map to {show(key)}; check name_map")
            leaves[key] = label
    for key in leaves:
        for n in range(2, len(key)):
            if key[:n] in leaves:
                raise ValueError(f"{leaves[key]} maps below {show(key[:n])}, which holds {leaves[key[:n]]}; "
                                 f"check name_map")


def _flat(tree: Any, prefix: Key, out: dict[Key, Any]) -> None:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            _flat(value, (*prefix, key), out)
    else:
        out[prefix] = tree


def flatten_trees(trees: Mapping[str, Any]) -> dict[Key, Any]:
    given: dict[Key, Any] = {}
    for collection, tree in trees.items():
        _flat(tree, (collection,), given)
    return given


def match(groups: list[Group], given: Mapping[Key, Any], collections: tuple[str, ...], what: str,
           module: nn.Module) -> None:
    """The leaves of ``groups`` in ``collections`` are exactly ``given``'s keys, with its shapes.

    ``given`` is the tree being loaded, or the ``target`` of an export (``what`` names the call).
    """
    exporting = what.startswith("export")
    expected = {key: (group, rel) for group in groups for rel, key in group.keys.items()
                if key[0] in collections}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys(), key=str)
    if (missing or unexpected) and exporting:
        raise ValueError(f"{what}: {type(module).__name__} does not fit the target: it gives leaves the "
                         f"target lacks [{listing(missing)}]; the target has leaves it does not give "
                         f"[{listing(unexpected)}]; check name_map")
    if missing or unexpected:
        raise ValueError(f"{what}: the tree does not match {type(module).__name__}: "
                         f"missing [{listing(missing)}]; unexpected [{listing(unexpected)}]")
    for key, (group, rel) in expected.items():
        value = given[key]
        shape = tuple(value.shape) if hasattr(value, "shape") else np.shape(value)
        if shape != group.shapes[rel] and exporting:
            raise ValueError(f"{show(key)}: {group.where()} gives shape {group.shapes[rel]}, the target has "
                             f"{shape}")
        if shape != group.shapes[rel]:
            raise ValueError(f"{show(key)}: expected shape {group.shapes[rel]}, got {shape}")

