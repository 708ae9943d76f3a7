"""The Flax side of a pair as the verifier runs it: a Linen module, its keyword inputs, static options.

Two kinds of Flax twin are accepted:

* a Linen ``Module`` (hand-written twins, model-zoo ports), applied as
  ``module.apply(variables, *x, **apply_kwargs)``;
* a Hugging Face ``FlaxPreTrainedModel`` (``FlaxBertForSequenceClassification``),
  whose ``__call__`` fills in what the user did not pass (``position_ids``,
  ``head_mask``, ``deterministic=not train``) and then calls its Linen ``.module``.
  The verifier runs that ``.module`` with the converted weights (never the
  wrapper: the wrapper casts images to float32, which a float64 run must not
  do), with the arguments the wrapper *would* pass: it calls the wrapper once
  under ``flax.linen.intercept_methods`` and stops it at the top module's call,
  before anything is computed. The user's own arrays (in the run's dtype) take
  the place of the wrapper's casts; the other arrays become extra keyword
  inputs; booleans and ``None`` become static apply keywords.

Hugging Face Flax modules compute in their ``dtype`` field (default float32),
whatever their inputs and weights: a float64 run needs the twin built with
``dtype=jnp.float64`` (``check_compute_dtype`` says so instead of failing every row).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as linen
import jax
import numpy as np

from parity_tests.verifier.inputs import Inputs, call_arguments, describe
from parity_tests.verifier.rows import first_line
from parity_tests.verifier.settings import FlaxCalls, record_flax_calls


@dataclass(frozen=True)
class FlaxTwin:
    """What the verifier applies: ``module.apply(variables, x, **dict(apply_kwargs))``.

    ``x`` is the user's inputs in the Flax layout, completed with the arrays a
    Hugging Face wrapper adds (then always a dict of keyword inputs).
    """

    module: linen.Module
    x: Inputs
    apply_kwargs: tuple[tuple[str, Any], ...]
    pretrained: bool = False


def is_pretrained_wrapper(model: Any) -> bool:
    """A Hugging Face ``FlaxPreTrainedModel`` (duck-typed: a callable with a Linen ``.module``)."""
    return (not isinstance(model, linen.Module) and callable(model)
            and isinstance(getattr(model, "module", None), linen.Module))


def hashable_kwargs(kwargs: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """``flax_apply_kwargs`` as sorted items: a static argument of the compiled step."""
    items = tuple(sorted(dict(kwargs or {}).items()))
    try:
        hash(items)
    except TypeError as e:
        raise ValueError(
            f"flax_apply_kwargs values must be hashable (True, 0.5, 'name'); got {kwargs!r}") from e
    return items


def flax_twin(flax_model: Any, x_torch_layout: Inputs, x_flax: Inputs, apply_kwargs: Mapping[str, Any],
              *, train: bool, dtype: str) -> FlaxTwin:
    """The Linen module, inputs and static keywords to run ``flax_model`` with (see the module docstring).

    Raises:
      ValueError: not a Flax model; a compute ``dtype`` narrower than the run's; a wrapper that
        cannot be called on the inputs.
    """
    if isinstance(flax_model, linen.Module):
        check_compute_dtype(flax_model, dtype)
        return FlaxTwin(flax_model, x_flax, hashable_kwargs(apply_kwargs))
    if not is_pretrained_wrapper(flax_model):
        raise ValueError("the Flax model must be a flax.linen.Module or a Hugging Face FlaxPreTrainedModel, "
                         f"got {type(flax_model).__name__}")
    module = flax_model.module
    check_compute_dtype(module, dtype)
    recorded = _wrapper_arguments(flax_model, x_torch_layout, train)
    given = _bind(module, x_flax)
    arrays = {k: v for k, v in recorded.items() if k not in given and _is_array(v)}
    static = {k: v for k, v in recorded.items() if k not in given and not _is_array(v)}
    inputs = {**given, **{k: np.asarray(v) for k, v in arrays.items()}}
    return FlaxTwin(module, inputs, hashable_kwargs({**static, **dict(apply_kwargs)}), pretrained=True)


def check_compute_dtype(module: linen.Module, dtype: str) -> None:
    """One-line ``ValueError`` when ``module.dtype`` (its compute dtype) is narrower than ``dtype``."""
    compute = getattr(module, "dtype", None)
    try:
        compute = np.dtype(compute) if compute is not None else None
    except TypeError:
        return  # a field named dtype that is no dtype: nothing to check
    if compute is not None and compute.kind == "f" and compute.itemsize < np.dtype(dtype).itemsize:
        raise ValueError(
            f"the Flax model {type(module).__name__} computes in {compute} (its dtype field) but this is a "
            f"{dtype} run: build it with dtype=jnp.{dtype} (Hugging Face Flax models default to float32, "
            f"e.g. FlaxBertForSequenceClassification(config, dtype=jnp.{dtype}))")


class _Placeholder(dict):
    """Stands for the weights in the recording call, which stops before they are read: any key gives
    another placeholder (Hugging Face's ResNet reads ``params["batch_stats"]``), and it is not empty
    (BERT's ``params or self.params`` must keep it)."""

    def __missing__(self, key):
        return _Placeholder(unused={})


class _Stop(Exception):
    """Raised by the recorder at the top module's call: the wrapper's arguments are known."""


def _wrapper_arguments(wrapper: Any, x: Inputs, train: bool) -> dict[str, Any]:
    """``{parameter: value}`` the Hugging Face wrapper passes to ``wrapper.module`` for the inputs ``x``.

    The wrapper runs until its Linen module's ``__call__`` starts (nothing is
    computed, the weights are never read: a placeholder stands for them).
    """
    recorded: list[dict[str, Any]] = []

    def recorder(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and module.scope is not None and not module.path:
            recorded.append(inspect.signature(type(module).__call__).bind(module, *args, **kwargs).arguments)
            raise _Stop
        return next_fun(*args, **kwargs)

    args, kwargs = call_arguments(x)
    options = {"train": train} if "train" in inspect.signature(wrapper.__call__).parameters else {}
    try:
        with linen.intercept_methods(recorder):
            wrapper(*args, **kwargs, params=_Placeholder(unused={}), **options)
    except _Stop:
        pass
    except Exception as e:  # the user's model: any exception means it cannot take these inputs
        raise ValueError(f"the Flax model {type(wrapper).__name__} cannot be called on the inputs: "
                         f"{type(e).__name__}: {first_line(e)}") from e
    if not recorded:
        raise ValueError(f"the Flax model {type(wrapper).__name__} did not call its .module; pass the Linen "
                         "module itself as the Flax twin")
    arguments = dict(recorded[0])
    arguments.pop("self", None)
    return arguments


def _bind(module: linen.Module, x: Inputs) -> dict[str, Any]:
    """The user's inputs as ``{parameter name: array}`` of ``module.__call__`` (positional by position)."""
    args, kwargs = call_arguments(x)
    try:
        bound = inspect.signature(type(module).__call__).bind_partial(module, *args, **kwargs).arguments
    except TypeError as e:
        raise ValueError(f"the inputs do not fit {type(module).__name__}.__call__: {e}") from e
    return {k: v for k, v in bound.items() if k != "self"}


def _is_array(value: Any) -> bool:
    return isinstance(value, jax.Array | np.ndarray)


def abstract_init(twin: FlaxTwin) -> tuple[dict, FlaxCalls]:
    """``jax.eval_shape`` of the twin's ``init`` (every collection), and the module calls it made.

    A ``"dropout"`` rng is given so that a Flax dropout left on is reported by
    ``check_flax_dropout_off`` rather than failing inside ``init``.
    """
    args, kwargs = call_arguments(twin.x)
    apply_kwargs = dict(twin.apply_kwargs)

    def init(*a, **k):
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        return twin.module.init(rngs, *a, **k, **apply_kwargs)

    try:
        with record_flax_calls() as calls:
            shapes = jax.eval_shape(init, *args, **kwargs)
    except Exception as e:  # the user's module: any exception means it cannot run on x
        raise ValueError(f"the Flax module {type(twin.module).__name__} cannot be initialised on the inputs "
                         f"({describe(twin.x)}) with apply kwargs {apply_kwargs}: {type(e).__name__}: "
                         f"{first_line(e)}") from e
    return dict(shapes), calls
