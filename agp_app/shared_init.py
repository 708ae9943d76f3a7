"""``--init shared``: initial weights drawn once in NumPy, in the Flax layout, for both frameworks.

``draw_shared_variables(shapes, seed)`` takes the tree of shapes of a model's variables in the
Flax layout, ``{"params": {...}, "batch_stats": {...}}`` (from ``jax.eval_shape(model.init, ...)``
or from ``torch_ref.export_flax_variables(torch_model)``; leaves are shape tuples or anything with
``.shape``), and returns the same tree of float32 NumPy arrays (cast to the run's dtype later).
The JAX CLI uses it as its variables, the PyTorch CLI loads it with
``torch_ref.load_flax_variables``: both start from identical weights.

Rules, by leaf name (PyTorch's default initialisation of each layer type, so a shared start is
statistically the start either framework would have drawn):

==============================  ===========================================================
leaf                            value
==============================  ===========================================================
params ``kernel``               U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = prod(shape[:-1])
                                (Flax HWIO conv kernels: kh*kw*I/g; Dense (in, out): in);
                                PyTorch's ``kaiming_uniform_(a=sqrt(5))`` of Conv/Linear
params ``bias`` beside a kernel  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the kernel's fan_in
params ``bias`` of a norm layer  0 (BatchNorm/LayerNorm/GroupNorm: no kernel beside it)
params ``scale``                1
params ``embedding``            N(0, 1) (``nn.Embedding``'s default)
batch_stats ``mean`` / ``var``  0 / 1
==============================  ===========================================================

Any other leaf or collection is a ``ValueError`` naming its path (nothing is drawn silently);
``perturbations`` and ``intermediates`` (no weights) are left out. Every tensor has its own
``np.random.default_rng`` seeded with ``seed`` and a hash of its path, so the draw does not depend
on the order of the dicts, on which other layers exist, or on the framework.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Collections of a Flax init that hold no weights: not drawn, left out of the result.
IGNORED_COLLECTIONS = ("perturbations", "intermediates")
#: Collections drawn.
COLLECTIONS = ("params", "batch_stats")


def path_seed(seed: int, path: tuple[str, ...]) -> list[int]:
    """Seed words of the tensor at ``path``: ``[seed, 8 uint32 words of sha256("/".join(path))]``."""
    digest = hashlib.sha256("/".join(path).encode()).digest()
    return [seed, *np.frombuffer(digest, dtype=np.uint32).tolist()]


def _shape(leaf: Any, path: tuple[str, ...]) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", leaf)
    if not isinstance(shape, tuple | list) or not all(isinstance(d, int | np.integer) for d in shape):
        raise ValueError(f"{'/'.join(path)}: expected a shape (tuple of ints) or an array, got {leaf!r}")
    return tuple(int(d) for d in shape)


def fan_in(kernel_shape: tuple[int, ...]) -> int:
    """Inputs per output of a Flax kernel: ``prod(shape[:-1])`` (HWIO conv: kh*kw*I/g; Dense: in)."""
    return math.prod(kernel_shape[:-1])


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], fan: int) -> np.ndarray:
    bound = 1 / math.sqrt(fan) if fan else 0.0  # PyTorch's bound; an empty kernel has nothing to draw
    return rng.uniform(-bound, bound, shape)


def _draw_param(path: tuple[str, ...], shape: tuple[int, ...], siblings: Mapping[str, Any],
                seed: int) -> np.ndarray:
    name, rng = path[-1], np.random.default_rng(path_seed(seed, path))
    if name == "kernel":
        return _uniform(rng, shape, fan_in(shape))
    if name == "bias" and "kernel" in siblings:
        return _uniform(rng, shape, fan_in(_shape(siblings["kernel"], (*path[:-1], "kernel"))))
    if name == "bias":
        return np.zeros(shape)
    if name == "scale":
        return np.ones(shape)
    if name == "embedding":
        return rng.standard_normal(shape)
    raise ValueError(f"params/{'/'.join(path[1:])}: no shared-init rule for a leaf named {name!r} "
                     "(known: kernel, bias, scale, embedding); use the framework's own init for this model")


def _draw_stat(path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    rules = {"mean": np.zeros, "var": np.ones}
    if path[-1] not in rules:
        raise ValueError(f"{'/'.join(path)}: no shared-init rule for batch statistics named {path[-1]!r} "
                         "(known: mean, var)")
    return rules[path[-1]](shape)


def _draw(tree: Mapping[str, Any], path: tuple[str, ...], seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        where = (*path, str(key))
        if isinstance(value, Mapping):
            out[key] = _draw(value, where, seed)
            continue
        shape = _shape(value, where)
        drawn = _draw_param(where, shape, tree, seed) if path[0] == "params" else _draw_stat(where, shape)
        out[key] = drawn.astype(np.float32)
    return out


def draw_shared_variables(shapes: Mapping[str, Any], seed: int) -> dict[str, dict[str, Any]]:
    """The shared initial variables of a model whose Flax-layout shapes are ``shapes`` (module docstring).

    Returns ``{"params": ..., "batch_stats": ...}`` (the collections ``shapes`` has) of float32 arrays.
    """
    unknown = set(shapes) - set(COLLECTIONS) - set(IGNORED_COLLECTIONS)
    if unknown:
        raise ValueError(f"no shared-init rule for the collections {sorted(unknown)} (known: "
                         f"{', '.join(COLLECTIONS)}); use the framework's own init for this model")
    return {c: _draw(shapes[c], (c,), seed) for c in COLLECTIONS if c in shapes}
