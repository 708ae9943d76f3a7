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

On CPU the copy's ``nnx.Conv`` layers get fast derivatives the same way
(``fast_convolutions``, ``jax_impl.fast_conv``); ``fast_convolutions=False``
turns it off. The same limit applies to them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl import fast_conv
from jax_impl.conv_impl import ConvImpl, resolve_conv_impl
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


class _Hook(NamedTuple):
    """What a hooked submodule's ``__call__`` does for one forward pass: log it and add its perturbation
    through ``capturer`` (by attribute ``path``) when set, compute an ``nnx.Conv`` with ``conv_impl``'s
    fast derivatives (``jax_impl.fast_conv``) when set."""

    capturer: Capturer | None
    path: tuple[str, ...]
    conv_impl: ConvImpl | None


def _hooked_class(cls: type) -> type:
    """A subclass of the NNX module class ``cls`` whose ``__call__`` does what ``_hooked`` registered for
    the instance (``_HOOKS``: a ``_Hook``), and is ``cls.__call__`` for any other instance. Made once per
    class (``_HOOKED_CLASSES``); its ``__call__`` declares ``cls.__call__`` as the one it wraps
    (``functools.wraps``, ``fast_conv.PASSES_CALL_THROUGH``), which tells ``fast_conv.intercepts`` that
    flax's computation is unchanged."""
    if cls not in _HOOKED_CLASSES:

        @functools.wraps(cls.__call__)
        def __call__(self, *args, **kwargs):
            hook = (_HOOKS.get() or {}).get(id(self))
            call = super(hooked, self).__call__
            if hook is None:
                return call(*args, **kwargs)
            if hook.conv_impl is not None:
                call = functools.partial(_conv_call, self, call, hook.conv_impl)
            if hook.capturer is None:
                return call(*args, **kwargs)
            return hook.capturer.call(hook.path, cls.__name__, call, *args, **kwargs)

        setattr(__call__, fast_conv.PASSES_CALL_THROUGH, True)
        hooked = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                             "__qualname__": cls.__qualname__})
        _HOOKED_CLASSES[cls] = hooked
    return _HOOKED_CLASSES[cls]


def _conv_call(module: nnx.Conv, flax_call, impl: ConvImpl, *args, **kwargs):
    """``module(*args, **kwargs)``: by ``fast_conv.nnx_conv_call`` where ``fast_conv.intercepts`` accepts
    the module and its one input, else by flax (``flax_call``)."""
    if len(args) == 1 and not kwargs and fast_conv.intercepts(module, args[0]):
        return fast_conv.nnx_conv_call(module, args[0], impl)
    return flax_call(*args, **kwargs)


_HOOKED_CLASSES: dict[type, type] = {}
#: ``{id(module): _Hook}`` of the forward pass running in this context.
_HOOKS: contextvars.ContextVar[dict[int, _Hook] | None] = contextvars.ContextVar(
    "jax_impl_nnx_hooks", default=None)


def _merged_hook(outer: _Hook | None, inner: _Hook) -> _Hook:
    """One module's hook inside two contexts: the inner context's capture and convolution where it sets
    them, the enclosing one's otherwise."""
    if outer is None:
        return inner
    if inner.capturer is not None:
        outer = outer._replace(capturer=inner.capturer, path=inner.path)
    return outer._replace(conv_impl=inner.conv_impl) if inner.conv_impl is not None else outer


@contextlib.contextmanager
def _hooked(module: nnx.Module, capturer: Capturer | None, conv_impl: ConvImpl | None = None):
    """Route the submodules' ``__call__`` of ``module`` through ``capturer`` (every callable submodule, by
    attribute path ``("layers", "0", "conv")``) and/or, for every ``nnx.Conv`` (the root included),
    through the fast convolution ``conv_impl``.

    Each such submodule's ``__class__`` is swapped for ``_hooked_class`` (a subclass, same layout) for
    the duration, and restored after: the module's state (its Variables) is untouched. Nested inside
    another ``_hooked`` (two models, or capture around fast convolutions), the enclosing hooks stay:
    the registries are merged (``_merged_hook``) and a module already swapped is not swapped again.
    """
    registry, swapped = dict(_HOOKS.get() or {}), []
    for path, sub in nnx.iter_modules(module):
        conv = conv_impl if isinstance(sub, nnx.Conv) else None
        if not callable(sub) or (conv is None and (capturer is None or not path)):
            continue
        hook = _Hook(capturer, tuple(str(p) for p in path), conv)
        registry[id(sub)] = _merged_hook(registry.get(id(sub)), hook)
        if type(sub) not in _HOOKED_CLASSES.values():  # else an enclosing context swapped it already
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


def _fast_conv_impl(enabled: bool | None, impl: str | ConvImpl = "auto") -> ConvImpl | None:
    """The convolution that ``nnx.Conv`` layers get (``None``: flax's own). ``enabled=None``: on CPU only
    (XLA's GPU and TPU convolutions differentiate fast already). Resolved once, outside the layers."""
    if enabled is None:
        enabled = jax.default_backend() == "cpu"
    return resolve_conv_impl(impl) if enabled else None


@contextlib.contextmanager
def fast_convolutions(model: nnx.Module, enabled: bool | None = None, *,
                      impl: str | ConvImpl = "auto") -> Iterator[None]:
    """Within this context every ``nnx.Conv`` of ``model`` has fast derivatives (``jax_impl.fast_conv``).

    The NNX counterpart of ``jax_impl.fast_convolutions`` (Linen): each call
    that ``fast_conv.intercepts`` accepts (any stride, padding, dilation,
    ``feature_group_count``; 1-D or 2-D) is computed as pad + stride-1 VALID
    convolutions whose derivatives of every order (reverse mode) stay fast
    convolutions; the rest run flax's ``__call__``. Same values up to float
    rounding, same parameters. ``enabled``: ``None`` (default) on CPU only,
    ``True``/``False`` everywhere; ``impl`` as in ``jax_impl.fast_convolutions``.
    ``penalized_loss`` enters it itself (``fast_convolutions=False`` turns it
    off); a step of your own enters it where the model is traced::

        def loss(model):
            with jax_impl.nnx.fast_convolutions(model):
                return my_penalised_loss(model, x, y)
        grads = nnx.grad(loss)(model)

    The convolutions' classes are swapped for subclasses (same layout) for
    the duration and restored after; like the Linen context it acts while
    the model is traced (trace a jitted function inside it).
    """
    conv_impl = _fast_conv_impl(enabled, impl)
    with _hooked(model, None, conv_impl) if conv_impl is not None else contextlib.nullcontext():
        yield


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
                capture_modules: Mapping[str, str] | None = None, fast_convolutions: bool | None = False):
    """``forward(perturbations, x) -> (outputs, updated BatchStat state or None)`` for an NNX model.

    ``perturbations`` holds the ``capture()`` points (``nnx.capture(..., init=...)``) and the
    ``capture_modules`` names (added to those submodules' outputs, first element of a tuple).
    ``x``: an array, a tuple (``model(*x)``) or a dict (``model(**x)``). ``fast_convolutions``:
    the model's ``nnx.Conv`` layers run as in the context ``fast_convolutions`` (``None``: on CPU).
    """
    graphdef, state = nnx.split(model)
    kwargs = dict(call_kwargs or {})
    specs = parse_capture_modules(capture_modules)
    conv_impl = _fast_conv_impl(fast_convolutions)

    def forward(perturbations: dict[str, jax.Array], x: Any):
        # A fresh copy per call: BatchNorm mutates its BatchStat, which NNX only
        # allows at the trace level where the Variable was created.
        module = nnx.merge(graphdef, state, copy=True)
        init = nnx.from_flat_state(
            [(tuple(name.split(SEP)), nnx.Perturbation(value)) for name, value in perturbations.items()
             if name not in specs]
        )
        capturer = Capturer(specs, {name: perturbations[name] for name in specs})
        hooks = specs or conv_impl is not None
        with _hooked(module, capturer if specs else None, conv_impl) if hooks else contextlib.nullcontext():
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
    fast_convolutions: bool = True,
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
    On CPU the model's ``nnx.Conv`` layers get fast derivatives (the context
    ``fast_convolutions``; same values up to rounding); ``fast_convolutions=False``
    runs flax's own convolutions. ``model`` itself is not changed (the
    forward pass runs on a copy), except for the BatchStat write-back.
    """
    check_loss_inputs(x, penalty_weight)  # before the forward pass, which cannot take a batch of 0
    zeros = zero_perturbations(model, x, capture_modules=capture_modules, call_kwargs=call_kwargs)
    if examples_interact is None:
        examples_interact = bool(jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    total, aux = penalized_loss_from_forward(
        nnx_forward(model, call_kwargs=call_kwargs, capture_modules=capture_modules,
                    fast_convolutions=None if fast_convolutions else False), zeros, x, y,
        penalty_weight=penalty_weight, examples_interact=examples_interact, **options,
    )
    if "model_state" in aux:
        nnx.update(model, aux["model_state"])
    return total, aux
