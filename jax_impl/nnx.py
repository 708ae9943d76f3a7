"""The activation gradient penalty for Flax NNX modules (Flax >= 0.12.6, ``nnx.capture``).

An NNX model marks a capture point with one line in ``__call__``::

    x = capture(self, "relu1", x)     # jax_impl.nnx.capture: self.perturb + self.sow

and ``penalized_loss(model, x, y, penalty_weight=...)`` gives the same numbers
as ``jax_impl.penalized_loss`` on the equivalent Linen model, with the same
options (it runs the same core, ``penalty.penalized_loss_from_forward``).
Differentiate it with ``nnx.grad`` / ``nnx.value_and_grad`` over the model::

    grads = nnx.grad(lambda m: penalized_loss(m, x, y, penalty_weight=10.0)[0])(model)

Under the hood the model is ``nnx.split`` into a graph and a state, and every
forward pass merges a fresh copy and runs it under
``nnx.capture(module, init=perturbations)``: ``Module.perturb`` then returns
``value + perturbation``, whose gradient is d loss / d a. ``BatchStat``
updates (BatchNorm in train mode) are written back into ``model``.

A model without ``capture`` lines names submodules by attribute path instead,
``penalized_loss(model, x, y, penalty_weight=1.0, capture_modules={"c": "layers/0/conv"})``
(``capture_points(model, x)`` lists them): on the fresh copy, each submodule's
class is swapped for a subclass whose ``__call__`` adds the perturbation to
the output (first element of a tuple); the state written back is unchanged.
Limit: a submodule run inside an NNX transform that splits and merges it
again (``nnx.vmap``/``nnx.scan`` over it) is a new object there and is not seen.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.layers import max_pool_2x2
from jax_impl.module_capture import (
    SEP,
    Capturer,
    call_with_inputs,
    check_capture_names,
    parse_capture_modules,
    path_name,
)
from jax_impl.penalty import penalized_loss_from_forward
from jax_impl.validation import check_loss_inputs

#: Capture points of ``Net``, in forward order (same as the Linen ``Net``).
CAPTURE_NAMES = ("relu1", "relu2")


def capture(module: nnx.Module, name: str, x: jax.Array) -> jax.Array:
    """Mark ``x`` as the capture point ``name`` of an NNX module and return it.

    Inside ``nnx.capture`` this is ``module.perturb(name, x)`` (``x`` plus a
    zero perturbation) followed by ``module.sow(nnx.Intermediate, name, x)``.
    Outside any ``nnx.capture`` context it returns ``x`` untouched: plain
    inference stays free of perturbation variables (``perturb``/``sow`` would
    otherwise create them as attributes and warn).
    """
    # nnx.capture marks a running capture by setting __captures__ on every module.
    if not hasattr(module, "__captures__"):
        return x
    x = module.perturb(name, x)
    module.sow(nnx.Intermediate, name, x)
    return x


class Net(nnx.Module):
    """The seed CNN in NNX: same layers, parameter names and capture points as ``jax_impl.Net``.

    conv5x5(C->32) -> maxpool2 -> relu (``relu1``) -> conv5x5(32->64) -> maxpool2
    -> relu (``relu2``) -> flatten (h, w, c) -> linear(->num_classes). Input
    NHWC (B, image_size, image_size, C). Initialisation is NNX's default
    (not PyTorch's); tests copy weights.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, *, rngs: nnx.Rngs):
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size must be at least 16 for two conv5x5+pool2 stages, got {image_size}")
        self.conv1 = nnx.Conv(in_channels, 32, (5, 5), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (5, 5), padding="VALID", rngs=rngs)
        self.linear = nnx.Linear(64 * side * side, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(max_pool_2x2(self.conv1(x)))  # (B, 14, 14, 32)
        x = capture(self, "relu1", x)
        x = nnx.relu(max_pool_2x2(self.conv2(x)))  # (B, 5, 5, 64)
        x = capture(self, "relu2", x)
        x = x.reshape(x.shape[0], -1)  # (B, 1600), (h, w, c) order
        return self.linear(x)  # (B, 10)


def _hooked_class(cls: type) -> type:
    """A subclass of the NNX module class ``cls`` whose ``__call__`` goes through the ``Capturer`` that
    ``_hooked`` registered for the instance (``_HOOKS``), and is ``cls.__call__`` for any other instance.
    Made once per class (``_HOOKED_CLASSES``)."""
    if cls not in _HOOKED_CLASSES:

        def __call__(self, *args, **kwargs):
            entry = (_HOOKS.get() or {}).get(id(self))
            call = super(hooked, self).__call__
            if entry is None:
                return call(*args, **kwargs)
            capturer, path = entry
            return capturer.call(path, cls.__name__, call, *args, **kwargs)

        hooked = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                             "__qualname__": cls.__qualname__})
        _HOOKED_CLASSES[cls] = hooked
    return _HOOKED_CLASSES[cls]


_HOOKED_CLASSES: dict[type, type] = {}
#: ``{id(module): (Capturer, attribute path)}`` of the forward pass running in this context.
_HOOKS: contextvars.ContextVar[dict[int, tuple[Capturer, tuple[str, ...]]] | None] = contextvars.ContextVar(
    "jax_impl_nnx_hooks", default=None)


@contextlib.contextmanager
def _hooked(module: nnx.Module, capturer: Capturer):
    """Route every callable submodule's ``__call__`` of ``module`` (a fresh copy made for one forward
    pass) through ``capturer``, by attribute path (``("layers", "0", "conv")``).

    Each submodule's ``__class__`` is swapped for ``_hooked_class`` (a subclass, same layout) for the
    duration, and restored after: the module's state (its Variables) is untouched.
    """
    registry, swapped = {}, []
    for path, sub in nnx.iter_modules(module):
        if not path or not callable(sub):
            continue
        registry[id(sub)] = (capturer, tuple(str(p) for p in path))
        swapped.append((sub, type(sub)))
        # object.__setattr__: past nnx.Module's __setattr__, which tracks attributes of the graph.
        object.__setattr__(sub, "__class__", _hooked_class(type(sub)))
    token = _HOOKS.set(registry)
    try:
        yield
    finally:
        _HOOKS.reset(token)
        for sub, cls in swapped:
            object.__setattr__(sub, "__class__", cls)


def _probe(graphdef, state, x: Any, capture_modules: Mapping[str, str] | None, call_kwargs: Mapping | None):
    """One abstract forward pass (``jax.eval_shape``): ``([(path, ShapeDtypeStruct)] of the capture()
    points, Capturer with the capture_modules shapes and every submodule call)``.

    Raises the one-line ``ValueError`` of ``jax_impl.capture`` for a ``capture()`` name reached twice,
    a name in both, and a ``capture_modules`` path not called (with the nearest paths).
    """
    specs = parse_capture_modules(capture_modules)
    capturer = Capturer(specs)

    def shapes(s, inputs):
        kwargs = dict(call_kwargs or {})
        module = nnx.merge(graphdef, s)
        with _hooked(module, capturer):
            _, perturbations = call_with_inputs(nnx.capture(module, nnx.Perturbation), inputs, **kwargs)
        # nnx.capture(m, A, B) returns B's state empty (flax 0.12.8), so the sown values (how often each
        # capture() point is reached) come from a second, unhooked pass; tracing only.
        run = nnx.capture(nnx.merge(graphdef, s), nnx.Intermediate)
        _, intermediates = call_with_inputs(run, inputs, **kwargs)
        return perturbations, intermediates

    perturbations, intermediates = jax.eval_shape(shapes, state, x)
    capturer.check()
    template = [(SEP.join(map(str, path)), var.get_value()) for path, var in nnx.to_flat_state(perturbations)]
    sown = {SEP.join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(intermediates)}
    check_capture_names([name for name, _ in template], sown, specs)
    return template, capturer


def zero_perturbations(model: nnx.Module, x: Any, *, capture_modules: Mapping[str, str] | None = None,
                       call_kwargs: Mapping | None = None) -> dict[str, jax.Array]:
    """``{"relu1": zeros(B, 14, 14, 32), ...}``: the NNX model's capture points at batch ``x``.

    Nested modules give ``"block/relu"`` (module path joined with "/"), as in Linen; then the
    ``capture_modules`` names, zeros shaped like those submodules' outputs (first element of a tuple).
    Shapes come from ``jax.eval_shape`` (no compute).
    """
    graphdef, state = nnx.split(model)
    template, capturer = _probe(graphdef, state, x, capture_modules, call_kwargs)
    shapes = {**dict(template), **{name: capturer.reached[name] for name in capturer.specs}}
    return {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}


def capture_points(model: nnx.Module, x: Any, *, call_kwargs: Mapping | None = None) -> dict[str, tuple]:
    """Every capture point of the NNX ``model`` at the batch ``x``: ``{name: output shape}``.

    Each submodule call whose output (or its first element) is an array, by attribute path as
    ``capture_modules`` takes it (``"layers/0/conv"``; ``"act:1"`` for the second call of a reused
    submodule), in call order, then the model's ``capture()`` points. Nothing is computed
    (``jax.eval_shape``).
    """
    graphdef, state = nnx.split(model)
    template, capturer = _probe(graphdef, state, x, None, call_kwargs)
    points = {path_name(path, k): tuple(shape.shape) for path, k, shape in capturer.log.calls
              if shape is not None}
    points.update({name: tuple(s.shape) for name, s in template})
    return points


def nnx_forward(model: nnx.Module, *, call_kwargs: Mapping | None = None,
                capture_modules: Mapping[str, str] | None = None):
    """``forward(perturbations, x) -> (outputs, updated BatchStat state or None)`` for an NNX model.

    ``perturbations`` holds the ``capture()`` points (``nnx.capture(..., init=...)``) and the
    ``capture_modules`` names (added to those submodules' outputs, first element of a tuple).
    ``x``: an array, a tuple (``model(*x)``) or a dict (``model(**x)``).
    """
    graphdef, state = nnx.split(model)
    kwargs = dict(call_kwargs or {})
    specs = parse_capture_modules(capture_modules)

    def forward(perturbations: dict[str, jax.Array], x: Any):
        # A fresh copy per call: BatchNorm mutates its BatchStat, which NNX only
        # allows at the trace level where the Variable was created.
        module = nnx.merge(graphdef, state, copy=True)
        init = nnx.from_flat_state(
            [(tuple(name.split(SEP)), nnx.Perturbation(value)) for name, value in perturbations.items()
             if name not in specs]
        )
        capturer = Capturer(specs, {name: perturbations[name] for name in specs})
        with _hooked(module, capturer) if specs else contextlib.nullcontext():
            outputs = call_with_inputs(nnx.capture(module, init=init), x, **kwargs)
        capturer.check()
        batch_stats = nnx.state(module, nnx.BatchStat)
        return outputs, (batch_stats if jax.tree.leaves(batch_stats) else None)

    return forward


def penalized_loss(
    model: nnx.Module,
    x: Any,
    y: jax.Array,
    *,
    penalty_weight: float | jax.Array,
    call_kwargs: Mapping | None = None,
    examples_interact: bool | None = None,
    capture_modules: Mapping[str, str] | None = None,
    **options,
) -> tuple[jax.Array, dict[str, Any]]:
    """``jax_impl.penalized_loss`` for an NNX ``model``: its ``capture()`` points and/or submodules by path.

    ``options`` are the Linen function's (``layers``, ``options=PenaltyOptions(...)``
    or its fields as keywords, ``example_weights``, ``loss_fn``); ``call_kwargs``
    are passed to ``model(x, **call_kwargs)``; ``x`` may be a tuple (``model(*x)``)
    or a dict (``model(**x)``). ``capture_modules={name: "attr/path[:k]"}`` names
    submodules by attribute path (``"layers/0/conv"``, or ``"layers.0.conv"``;
    ``:k`` for the k-th call of a reused one) whose outputs (first element of a
    tuple) are capture points too, as ``jax_impl.capture`` describes for Linen;
    ``capture_points(model, x)`` lists them.
    BatchNorm statistics updated by the forward pass are written back into
    ``model`` (``nnx.update``) and also returned as ``aux["model_state"]``;
    ``examples_interact=None`` means "the model has BatchStat variables".
    """
    check_loss_inputs(x, penalty_weight)  # before the forward pass, which cannot take a batch of 0
    zeros = zero_perturbations(model, x, capture_modules=capture_modules, call_kwargs=call_kwargs)
    if examples_interact is None:
        examples_interact = bool(jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    total, aux = penalized_loss_from_forward(
        nnx_forward(model, call_kwargs=call_kwargs, capture_modules=capture_modules), zeros, x, y,
        penalty_weight=penalty_weight, examples_interact=examples_interact, **options,
    )
    if "model_state" in aux:
        nnx.update(model, aux["model_state"])
    return total, aux
