"""The JAX trainer's state: ``TrainState``, the traced ``Hyperparams``, the optimizer, the initial weights."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agp_app.optim import optimizer_rule
from jax_impl.model import Net

Params = Any


class TrainState(NamedTuple):
    """Everything a step changes: ``step`` () int32 (optimizer steps done), ``params``, ``opt_state``."""

    step: jax.Array
    params: Params
    opt_state: Any


class Hyperparams(NamedTuple):
    """The compiled step's traced scalars, () arrays of the run's dtype: new values never recompile."""

    lr: jax.Array
    penalty_weight: jax.Array


def hyperparams(lr: float, penalty_weight: float, dtype) -> Hyperparams:
    """``Hyperparams`` of the given values in ``dtype`` (what a Python float becomes in that step)."""
    return Hyperparams(jnp.asarray(lr, dtype), jnp.asarray(penalty_weight, dtype))


#: ``agp_app.optim``'s rule kinds as optax optimizers.
_OPTAX = {"sgd": optax.sgd, "adam": optax.adam}


def make_optimizer(name: str, lr: float | jax.Array) -> optax.GradientTransformation:
    """``sgd`` (the seed's ``torch.optim.SGD``), ``momentum`` (SGD, momentum 0.9) or ``adam``.

    Same update rules as ``torch.optim.SGD(lr[, momentum])`` and ``torch.optim.Adam(lr)`` with
    their defaults (``agp_app.optim``). ``lr`` may be traced; the optimizer state does not depend on it.
    """
    rule = optimizer_rule(name)
    return _OPTAX[rule.kind](lr, **rule.kwargs)


@functools.cache
def _compiled_init(model: Net):
    # One compilation instead of dozens of small op-by-op ones (seconds on a 2-core CPU); same values.
    return jax.jit(model.init)


def init_params(model: Net, image_shape: Sequence[int], seed: int, dtype) -> Params:
    """Fresh parameters for images of ``image_shape`` (H, W, C), cast to ``dtype``."""
    params = _compiled_init(model)(jax.random.key(seed), jnp.zeros((1, *image_shape), dtype))["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


def create_train_state(params: Params, tx: optax.GradientTransformation) -> TrainState:
    """Step 0: ``params`` and a fresh optimizer state."""
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
