"""Cheap model parameters for the tests of tests/ (no pytest fixtures here).

Almost all of the time of these tests goes to XLA compiles, not to computing:

* ``jax.random`` with the default threefry key compiles one ~2.5 s program per
  parameter shape (a ``Net.init`` is ~15 s of it on a 2-core machine), so
  tests that only need *some* weights take them from ``variables_like``:
  the shapes of ``model.init`` (``jax.eval_shape``: traced, never compiled)
  filled from NumPy at PyTorch's default scale. The tests of ``init`` itself
  still call ``init``.
* every eager call of a differentiated model compiles each primitive on its
  own; ``jit`` compiles a function once, and ``parity_tests.harness.fast_jit``
  (the one fast-compiling ``jit`` of the test suites) makes that compile
  several times faster on CPU. It changes how XLA optimises and emits code,
  not what is computed: results differ by float rounding only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jax_impl.layers import PERTURBATIONS


def normal(shape: tuple[int, ...], seed: int, dtype=np.float64) -> jax.Array:
    """Standard normal values from NumPy (``jax.random`` would compile a program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _draw(path: tuple[str, ...], shape: tuple[int, ...], fan_in: dict, rng: np.random.Generator):
    """One variable's values, by its name: weights and biases at PyTorch's default scale
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), BatchNorm scales and variances around 1."""
    name = path[-1]
    if name in ("scale", "var"):
        return rng.uniform(0.5, 1.5, shape)
    if name == "mean":
        return 0.1 * rng.standard_normal(shape)
    if name == "kernel" or (name == "bias" and path[:-1] in fan_in):
        bound = 1.0 / math.sqrt(fan_in.get(path[:-1], 1))
        return rng.uniform(-bound, bound, shape)
    return 0.1 * rng.standard_normal(shape)  # e.g. a BatchNorm bias


def _fill(flat_shapes: dict[tuple, Any], seed: int, dtype) -> dict[tuple, jax.Array]:
    """Random values for a flat ``{path: ShapeDtypeStruct}`` (a bias takes its kernel's fan-in)."""
    rng = np.random.default_rng(seed)
    names = {path: tuple(map(str, path)) for path in flat_shapes}
    fan_in = {names[path][:-1]: math.prod(s.shape[:-1]) for path, s in flat_shapes.items()
              if names[path][-1] == "kernel" and len(s.shape) > 1}
    return {path: jnp.asarray(_draw(names[path], tuple(s.shape), fan_in, rng).astype(dtype))
            for path, s in sorted(flat_shapes.items(), key=lambda item: names[item[0]])}


def variables_like(model, *example_args, seed: int = 0, dtype=np.float64, **example_kwargs) -> dict:
    """A Linen model's variables (``params``, ``batch_stats``...) with the shapes ``model.init`` gives
    for ``example_args``, filled with random values (``_draw``) of ``dtype``; no compile.
    (The zero perturbations that ``init`` also creates are left out, as callers drop them.)"""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_args, **example_kwargs))
    shapes = {k: v for k, v in shapes.items() if k != PERTURBATIONS}
    flat = traverse_util.flatten_dict(shapes)
    return traverse_util.unflatten_dict(_fill(flat, seed, dtype))


def params_like(model, *example_args, seed: int = 0, dtype=np.float64, **example_kwargs) -> dict:
    """The ``params`` collection of ``variables_like``."""
    return variables_like(model, *example_args, seed=seed, dtype=dtype, **example_kwargs)["params"]


def nnx_like(make: Callable[[nnx.Rngs], nnx.Module], seed: int = 0, dtype=np.float32) -> nnx.Module:
    """The NNX module ``make(rngs)`` with every variable filled by ``_draw`` instead of its
    initialisers (built abstractly with ``nnx.eval_shape``, so its ``jax.random`` never runs)."""
    abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    values = _fill({path: var.get_value() for path, var in flat.items()}, seed, dtype)
    for path, var in flat.items():
        var.set_value(values[path])
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def fast_path(jaxpr: str) -> bool:
    """Whether a jaxpr was computed by ``jax_impl.fast_conv``'s path: closed-rule convolutions, grouped
    products, or patches and a matmul (no ``conv_general_dilated`` left)."""
    return "canonical_conv" in jaxpr or "grouped" in jaxpr or (
        "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr)


def check_each(names, check: Callable[[str], None]) -> None:
    """``check(name)`` for every case, then one failure naming every case that failed (not only the first)."""
    failed = []
    for name in names:
        try:
            check(name)
        except AssertionError as error:
            failed.append(f"{name}: {error}")
    assert not failed, "\n".join(failed)
