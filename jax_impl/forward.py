"""The model as one pure function: ``forward(perturbations, x) -> (outputs, state)``.

The penalty differentiates the loss with respect to zero perturbations ``p_l``
added at the capture points ``a_l`` (``d loss / d p_l == d loss / d a_l``), so it
reaches every model through one closure over the parameters and the other
collections:

    forward({"relu1": p1 (B, 14, 14, 32), "relu2": p2 (B, 5, 5, 64)}, x)
        -> (outputs, updated collections or None)

* ``linen_forward`` builds it for a Linen module, an ``apply`` function or a
  Hugging Face Flax model (``jax_impl.model_runner``), with the
  ``capture_modules`` points perturbed by module path (``jax_impl.module_capture``);
  ``jax_impl.nnx`` builds it for an NNX module.
* ``zero_perturbations`` gives the zeros ``{name: zeros(B, ...)}`` for every
  capture point, from tracing only (``jax.eval_shape``).
* ``_perturbed`` runs ``forward`` with the chosen perturbations, the one under
  ``"input"`` added to ``x`` itself (the input-gradient penalty).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from agp_common.penalty_spec import INPUT
from jax_impl.fast_conv import fast_convolutions as _fast_convolutions
from jax_impl.model_runner import Runner, is_hf_model, runner
from jax_impl.module_capture import intercepted, probe

__all__ = ["Apply", "Forward", "Params", "linen_forward", "zero_perturbations"]

Params = Any

#: ``forward(perturbations, x) -> (outputs, updated_state_or_None)``; the
#: perturbations are a flat ``{capture name: array}`` dict of the model's
#: capture points (never ``"input"``, which is added to ``x`` by the caller).
Forward = Callable[[dict[str, jax.Array], Any], tuple[Any, Any]]
#: ``apply(variables, x, mutable=...)``: ``Module.apply``, or a function with its signature.
Apply = Callable[..., Any]


def linen_forward(
    model: nn.Module | Apply,
    params: Params,
    *,
    model_state: Mapping | None = None,
    mutable: Sequence[str] = (),
    apply_kwargs: Mapping | None = None,
    rngs: Any = None,
    capture_modules: Mapping[str, str] | None = None,
) -> Forward:
    """``forward(perturbations, x)`` for a Linen module: ``model.apply`` with the perturbations.

    ``model`` is a Linen module, an ``apply`` function with ``Module.apply``'s
    signature (e.g. ``functools.partial(model.apply, train=True)``) or a
    Hugging Face Flax model (``jax_impl.capture``). ``x`` is one array, a
    tuple (positional inputs) or a dict (keyword inputs).
    Variables are ``{"params": params, **model_state, "perturbations": ...}``;
    the perturbations of ``capture_modules`` names (``{name: "path/to/module[:k]"}``)
    are added to those modules' outputs instead (``jax_impl.capture``).
    Returns ``(outputs, updated collections)`` when ``mutable`` names
    collections (e.g. ``["batch_stats"]``), else ``(outputs, None)``.
    """
    return _forward_of(runner(model, apply_kwargs=apply_kwargs, rngs=rngs), params, model_state, mutable,
                       capture_modules)


def _forward_of(run: Runner, params, model_state, mutable, capture_modules) -> Forward:
    """``forward(perturbations, x)`` from ``module_capture.runner``'s ``run``, capture by path outermost."""
    run = intercepted(run, capture_modules)
    mutable = list(mutable)

    def forward(perturbations: dict[str, jax.Array], x: Any):
        return run(params, model_state, perturbations, x, mutable)

    return forward


def zero_perturbations(
    model: nn.Module | Apply,
    params: Params,
    x: Any,
    *,
    model_state: Mapping | None = None,
    mutable: Sequence[str] = (),
    apply_kwargs: Mapping | None = None,
    rngs: Any = None,
    capture_modules: Mapping[str, str] | None = None,
) -> dict[str, jax.Array]:
    """Zero perturbations for every capture point of ``model`` at the batch ``x``.

    Returns a flat dict ``{"relu1": zeros(B, 14, 14, 32), ...}`` keyed by capture
    name (nested modules give ``"block/relu"``), then the ``capture_modules``
    names (zeros shaped like those modules' outputs, first element of a tuple).
    Shapes come from tracing only (``jax.eval_shape``), so this is free under
    ``jit`` and always matches the batch size of ``x``, not the one the model
    was initialised with. ``model`` and the keywords are as in ``linen_forward``.
    Raises a one-line ``ValueError`` for a ``capture()`` name reached twice
    and for a ``capture_modules`` path that is not called (listing the nearest).
    """
    return _zeros_of(runner(model, apply_kwargs=apply_kwargs, rngs=rngs), params, x, model_state, mutable,
                     capture_modules, hf=is_hf_model(model))


def _zeros_of(run: Runner, params, x, model_state, mutable, capture_modules, *, hf: bool):
    found = probe(run, params, model_state, x, mutable, capture_modules, with_collections=not hf)
    shapes = {**found.capture_shapes, **found.path_shapes}
    return {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}


def _linen_forward_and_zeros(params, model, x, model_state, mutable, keywords: dict,
                             fast: bool | None = False):
    """The forward closure and zero perturbations of a Linen model (pops ``apply_kwargs``, ``rngs``,
    ``capture_modules`` from ``keywords``); ``fast``: ``jax_impl.fast_conv.fast_convolutions``'s flag.

    The fast convolutions are entered inside each model run, so that capture by path
    (``jax_impl.capture``) intercepts first: an interceptor that replaces ``nn.Conv``'s computation
    ends the chain, and one entered before it would hide the ``nn.Conv`` calls from the capture.
    """
    run = runner(model, apply_kwargs=keywords.pop("apply_kwargs", None), rngs=keywords.pop("rngs", None))
    capture_modules = keywords.pop("capture_modules", None)
    if fast is not False:
        run = _with_fast_convolutions(run, fast)
    forward = _forward_of(run, params, model_state, mutable, capture_modules)
    zeros = _zeros_of(run, params, x, model_state, mutable, capture_modules, hf=is_hf_model(model))
    return forward, zeros


def _with_fast_convolutions(run: Runner, enabled: bool | None) -> Runner:
    def run_fast(*args):
        with _fast_convolutions(enabled):
            return run(*args)

    return run_fast


def _chosen_zeros(
    zeros: Mapping[str, jax.Array], x: jax.Array, layers: Sequence[str]
) -> dict[str, jax.Array]:
    """The perturbations that are differentiated: the chosen capture points, and ``x`` for ``"input"``."""
    return {name: (jnp.zeros_like(x) if name == INPUT else zeros[name]) for name in layers}


def _perturbed(forward: Forward, zeros: Mapping[str, jax.Array], x: jax.Array, reduce):
    """``chosen -> (reduce(outputs), (outputs, state))`` with the chosen perturbations applied.

    ``chosen`` holds perturbations of some capture points (added where the
    model marks them) and, under ``"input"``, one added to ``x``.
    """

    def run(chosen: Mapping[str, jax.Array]):
        inner = {**zeros, **{k: v for k, v in chosen.items() if k != INPUT}}
        inputs = x + chosen[INPUT] if INPUT in chosen else x
        outputs, state = forward(inner, inputs)
        return reduce(outputs), (outputs, state)

    return run
