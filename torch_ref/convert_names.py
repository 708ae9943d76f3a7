"""Names for the weight converter: where each PyTorch tensor's leaf goes in the Flax tree.

A PyTorch module path ``block1.conv`` is the Flax path ``("block1", "conv")``;
``name_map`` renames by path prefix, and a target tree (the Flax model's own)
settles the spelling of numbered children that Flax holds in list attributes
(``torch_ref.convert``'s docstring, "Names").
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from torch_ref.convert_rules import Key

NameMap = Mapping[str, str]


def show(key: Key) -> str:
    """("params", "block1", "kernel") -> "params['block1']['kernel']"."""
    return key[0] + "".join(f"[{part!r}]" for part in key[1:])


def _split_flax(path: str) -> Key:
    if path == "":
        return ()
    parts = tuple(re.split(r"[./]", path))
    if "" in parts:
        raise ValueError(f"name_map value {path!r} has an empty path component")
    return parts


def prefix_map(module: nn.Module, name_map: NameMap | None) -> list[tuple[Key, Key]]:
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


def flax_prefix(path: str, prefixes: list[tuple[Key, Key]]) -> Key:
    parts = tuple(path.split(".")) if path else ()
    for key, value in prefixes:  # longest first, so an exact path beats the prefix above it
        if parts[: len(key)] == key:
            return value + parts[len(key):]
    return parts


def children_of(keys: set[Key]) -> dict[Key, set[str]]:
    """Each path of the target tree -> the names directly below it."""
    out: dict[Key, set[str]] = {}
    for key in keys:
        for n in range(1, len(key)):
            out.setdefault(key[:n], set()).add(key[n])
    return out


def respell(key: Key, target: set[Key], children: dict[Key, set[str]]) -> Key:
    """``key`` as the target spells it, if it spells it otherwise; see the module docstring's "Names".

    A numbered PyTorch child ``layer.0`` may be a Flax list attribute: ``layer_0``
    (a list ``self.layer = [...]`` in the parent) or ``layer/layer_0`` (a wrapper
    module ``layer`` holding a list of the same name, as Hugging Face's Flax ResNet does).
    """
    if key in target:
        return key
    parts, out, i = key[1:], [key[0]], 0
    while i < len(parts):
        part, here = parts[i], children.get(tuple(out), set())
        following = parts[i + 1] if i + 1 < len(parts) else ""
        if part in here:
            out.append(part)
            i += 1
        elif following.isdigit() and f"{part}_{following}" in here:  # a list attribute of the parent
            out.append(f"{part}_{following}")
            i += 2
        elif part.isdigit() and len(listed := [c for c in here if c.endswith(f"_{part}")]) == 1:
            out.append(listed[0])  # the wrapper's own list attribute
            i += 1
        else:
            return key
    return tuple(out) if tuple(out) in target else key


def listing(keys: list[Key], limit: int = 8) -> str:
    shown = ", ".join(show(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
