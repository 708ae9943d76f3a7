"""One way to call any model: ``run(params, model_state, perturbations, x, mutable)``.

The penalty and the capture by path (``jax_impl.module_capture``) run models
of three kinds, with inputs of three kinds, through one ``Runner``:

* a Linen ``Module``: ``module.apply({"params": params, **model_state,
  "perturbations": tree}, *inputs, mutable=...)``;
* an ``apply`` function with ``Module.apply``'s signature, e.g.
  ``functools.partial(model.apply, train=True, rngs={"dropout": key})``;
* a Hugging Face ``FlaxPreTrainedModel`` (an object with a Linen ``.module``),
  called as ``model(*inputs, params=params)``, which fills in default
  attention masks and position ids; it has no other collections.

Inputs ``x``: one array (``apply(variables, x)``, batch first: (B, ...)), a
tuple of positional inputs (``apply(variables, *x)``) or a dict of keyword
inputs (``apply(variables, **x)``, e.g. ``{"input_ids": (B, T), ...}``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from jax_impl.layers import PERTURBATIONS

#: ``run(params, model_state, perturbation_tree | None, x, mutable) -> (outputs, new collections | None)``.
Runner = Callable[..., tuple[Any, Any]]

__all__ = ["Runner", "apply_fn", "call_with_inputs", "is_hf_model", "runner"]


def call_with_inputs(fn: Callable[..., Any], x: Any, *leading: Any, **keywords: Any) -> Any:
    """``fn(*leading, x)``; ``fn(*leading, *x)`` for a tuple; ``fn(*leading, **x)`` for a dict."""
    if isinstance(x, Mapping):
        return fn(*leading, **x, **keywords)
    if isinstance(x, tuple):
        return fn(*leading, *x, **keywords)
    return fn(*leading, x, **keywords)


def is_hf_model(model: Any) -> bool:
    """True for a Hugging Face ``FlaxPreTrainedModel`` (duck-typed: a callable object with a Linen ``.module``
    and ``.params``), which this module runs as ``model(*inputs, params=params)``."""
    return (not isinstance(model, nn.Module) and callable(model)
            and isinstance(getattr(model, "module", None), nn.Module) and hasattr(type(model), "params"))


def apply_fn(model: Any, apply_kwargs: Mapping | None = None, rngs: Any = None) -> Callable[..., Any]:
    """``model.apply`` for a Linen module (or ``model`` itself, a function like it), with bound keywords.

    ``apply_kwargs`` / ``rngs`` are the older spelling of
    ``functools.partial(model.apply, **apply_kwargs, rngs=rngs)`` and still work.
    """
    apply = model.apply if isinstance(model, nn.Module) else model
    if not callable(apply):
        raise TypeError("model must be a flax.linen Module, an apply function or a Hugging Face Flax model, "
                        f"got {type(model).__name__}")
    kwargs = dict(apply_kwargs or {})
    if rngs is not None:
        kwargs["rngs"] = rngs
    return functools.partial(apply, **kwargs) if kwargs else apply


def runner(model: Any, *, apply_kwargs: Mapping | None = None, rngs: Any = None) -> Runner:
    """``run(params, model_state, perturbations, x, mutable) -> (outputs, new collections or None)``.

    Linen module or apply function: ``apply({"params": params, **model_state,
    "perturbations": tree}, *inputs, mutable=...)``. Hugging Face model:
    ``model(*inputs, params=params, **apply_kwargs)``, which has no other
    collections (its own ``params`` tree holds BatchNorm statistics, used in eval mode).
    """
    if is_hf_model(model):
        kwargs = dict(apply_kwargs or {})
        if rngs is not None:
            kwargs["dropout_rng"] = rngs["dropout"] if isinstance(rngs, Mapping) else rngs

        def run_hf(params, model_state, perturbations, x, mutable):
            if model_state or mutable:
                raise ValueError("a Hugging Face model is run as model(*inputs, params=params): model_state "
                                 "and mutable do not apply; for train-mode BatchNorm pass "
                                 "functools.partial(model.module.apply, ...) as model instead")
            return call_with_inputs(model, x, params=params, **kwargs), None

        return run_hf
    apply = apply_fn(model, apply_kwargs, rngs)

    def run(params, model_state, perturbations, x, mutable):
        variables = {"params": params, **(model_state or {})}
        if perturbations is not None:
            variables[PERTURBATIONS] = perturbations
        if mutable:
            return call_with_inputs(apply, x, variables, mutable=list(mutable))
        return call_with_inputs(apply, x, variables), None

    return run
