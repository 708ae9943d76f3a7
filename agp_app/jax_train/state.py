"""The JAX trainer's state: ``TrainState``, the traced ``Hyperparams``, the optimizer, the initial weights."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agp_app.jax_models import BATCH_STATS
from agp_app.jax_recipe import named_optimizer as make_optimizer  # the one optax home, re-exported
from agp_app.shared_init import draw_shared_variables
from jax_impl.model import Net

Params = Any

__all__ = [
    "Hyperparams",
    "Params",
    "TrainState",
    "create_train_state",
    "hyperparams",
    "init_model_state",
    "init_params",
    "init_variables",
    "make_optimizer",
]


class TrainState(NamedTuple):
    """Everything a step changes: ``step`` () int32 (optimizer steps done), ``params``, ``opt_state``, and
    ``model_state``, the model's other variable collections (``{"batch_stats": ...}`` for BatchNorm;
    ``{}`` for a model without), updated by the train step and used as is by evaluation."""

    step: jax.Array
    params: Params
    opt_state: Any
    model_state: Any = {}  # noqa: RUF012 (never mutated; a NamedTuple default)


class Hyperparams(NamedTuple):
    """The compiled step's traced scalars, () arrays of the run's dtype: new values never recompile."""

    lr: jax.Array
    penalty_weight: jax.Array


def hyperparams(lr: float, penalty_weight: float, dtype) -> Hyperparams:
    """``Hyperparams`` of the given values in ``dtype`` (what a Python float becomes in that step); arrays
    of per-step values (n,) for a chunk of steps."""
    return Hyperparams(jnp.asarray(lr, dtype), jnp.asarray(penalty_weight, dtype))


@functools.cache
def _compiled_init(model: Net):
    # One compilation instead of dozens of small op-by-op ones (seconds on a 2-core CPU); same values.
    return jax.jit(model.init)


def init_params(model, image_shape: Sequence[int], seed: int, dtype) -> Params:
    """Fresh parameters for images of ``image_shape`` (H, W, C), cast to ``dtype``."""
    params = _compiled_init(model)(jax.random.key(seed), jnp.zeros((1, *image_shape), dtype))["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


def init_variables(model, image_shape: Sequence[int], seed: int, dtype, init: str = "seeded"
                   ) -> tuple[Params, dict[str, Any]]:
    """``(params, model_state)`` of ``model`` for images of ``image_shape`` (H, W, C), cast to ``dtype``.

    ``init="seeded"``: ``model.init`` with ``jax.random.key(seed)``; ``"shared"``:
    ``agp_app.shared_init.draw_shared_variables`` of the shapes ``model.init`` would give (the same
    numbers the PyTorch CLI loads). ``model_state`` keeps only ``batch_stats`` (or is ``{}``).
    """
    x = jnp.zeros((1, *image_shape), dtype)
    if init == "shared":
        variables = draw_shared_variables(jax.eval_shape(model.init, jax.random.key(seed), x), seed)
    else:
        variables = _compiled_init(model)(jax.random.key(seed), x)
    variables = jax.tree.map(lambda p: jnp.asarray(p, dtype), dict(variables))
    model_state = {BATCH_STATS: variables[BATCH_STATS]} if BATCH_STATS in variables else {}
    return variables["params"], model_state


def init_model_state(model, image_shape: Sequence[int], seed: int, dtype, init: str = "seeded"
                     ) -> dict[str, Any]:
    """The ``model_state`` that ``init_variables`` gives, for a run that brings its own parameters:
    ``{}`` without running ``model.init`` when the model keeps no ``batch_stats`` (its shapes are
    enough to tell; compiling and running ``init`` took ~0.7 s on a 2-core CPU)."""
    shapes = jax.eval_shape(model.init, jax.random.key(seed), jnp.zeros((1, *image_shape), dtype))
    if BATCH_STATS not in shapes:
        return {}
    return init_variables(model, image_shape, seed, dtype, init)[1]


def create_train_state(params: Params, tx: optax.GradientTransformation,
                       model_state: dict[str, Any] | None = None) -> TrainState:
    """Step 0: ``params``, a fresh optimizer state and ``model_state`` (default ``{}``)."""
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), model_state or {})
