"""Capture points by module path: penalise a Flax model without editing its code.

A model written for this library marks its activations with ``layers.capture``
(the ``"perturbations"`` collection). A model written elsewhere (a Hugging
Face Flax twin, a model-zoo ResNet) has no such marks; ``capture_modules``
names its activations instead by the *path of the submodule* whose output
they are, the mirror of ``torch_ref``'s forward hooks::

    capture_modules = {"block0": "bert/encoder/layer/0", "relu2": "relu:1"}

* A path is the Linen module path joined by ``"/"`` (``module.path``), e.g.
  ``"bert/encoder/layer/0"`` for PyTorch's ``bert.encoder.layer.0``. The
  PyTorch spelling with ``"."`` is accepted too (a path matches when its
  ``"/"`` join or its ``"."`` join equals the spec; a spec that would match
  two modules is an error). The root module (path ``""``) is not a capture point.
* ``"path:k"`` is the k-th call (0-based) of that module in one forward pass,
  for a module that is called more than once; ``"path"`` is ``"path:0"``.
* The activation is the module's output; a module returning a tuple, list,
  dict or dataclass (Hugging Face layers return ``(hidden_states, ...)`` or a
  ``ModelOutput``) contributes its first element, which must be an array.

How: ``flax.linen.intercept_methods`` wraps every module ``__call__`` during
the forward pass; at the chosen (path, call) it returns ``output + p`` (on the
first element), with ``p`` a zero array that the penalty differentiates:
``d loss / d p == d loss / d output``. Only ``__call__`` counts as a call; a
re-entrant call of the same module (a subclass calling ``super().__call__``,
a lifted transform calling the wrapped module) belongs to the outer one.
Limits: inside ``nn.scan`` the body is traced once for all steps, so its
calls cannot be told apart; an interceptor entered *before* this one that
replaces a module's computation without calling ``next_fun`` hides that
module's calls (``penalized_loss`` therefore enters ``jax_impl.fast_conv``'s
inside each model run, after this one). ``jax_impl.nnx`` does the same for
NNX modules by attribute path.

``capture_points(model, x)`` lists every path that can be captured, with its
output shape, so one can pick names (``torch_ref.capture_points`` lists the
PyTorch twin's).

Models are reached as: a Linen ``Module`` (``module.apply``), an ``apply``
function with ``Module.apply``'s signature (``functools.partial(model.apply,
train=True)``), or a Hugging Face ``FlaxPreTrainedModel`` (an object with a
Linen ``.module``; called as ``model(*inputs, params=params)``, which fills
in default attention masks and position ids). Inputs ``x``: one array
(``apply(variables, x)``), a tuple (positional inputs, ``apply(variables,
*x)``) or a dict (keyword inputs, ``apply(variables, **x)``). How each is
called is ``jax_impl.model_runner``; where the activation sits in a
structured output is ``jax_impl.outputs``.

Importing: in the package namespace ``jax_impl.capture`` is the function
``layers.capture``; take this module's names with
``from jax_impl.module_capture import capture_points``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

from agp_common.penalty_spec import INPUT
from jax_impl.layers import INTERMEDIATES, PERTURBATIONS
from jax_impl.model_runner import Runner, call_with_inputs, is_hf_model, runner
from jax_impl.model_runner import apply_fn as apply_fn  # re-exported (its home before model_runner.py)
from jax_impl.outputs import _array_fields, first_element, replace_first
from jax_impl.outputs import model_logits as model_logits  # re-exported (its home before outputs.py)

SEP = "/"

__all__ = ["SEP", "capture_points", "first_element", "parse_capture_modules", "replace_first"]


# --------------------------------------------------------------------------- specs


def parse_spec(spec: str) -> tuple[str, int]:
    """``"bert/encoder/layer/0"`` -> ("bert/encoder/layer/0", 0); ``"relu:1"`` -> ("relu", 1)."""
    path, sep, index = spec.rpartition(":")
    if not sep:
        path, index = spec, "0"
    if not index.isdigit() or not path.strip(SEP + "."):
        raise ValueError(f"capture spec {spec!r}: expected 'path/to/module' or 'path/to/module:k' "
                         "with k >= 0")
    return path.strip(SEP), int(index)


def parse_capture_modules(capture_modules: Mapping[str, str] | None) -> dict[str, tuple[str, int]]:
    """``{capture name: (module path as given, call index k)}``; ``{}`` for ``None``.

    Raises a one-line ``TypeError``/``ValueError`` for a spec that is not a
    string, a name that is not a non-empty string or is ``"input"`` (the input
    capture), and two names naming the same call.
    """
    if capture_modules is None:
        return {}
    if not isinstance(capture_modules, Mapping):
        raise TypeError("capture_modules must be a dict {capture name: 'path/to/module' or 'path:k'}, got "
                        f"{type(capture_modules).__name__}")
    parsed: dict[str, tuple[str, int]] = {}
    for name, spec in capture_modules.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"capture_modules: capture names must be non-empty strings, got {name!r}")
        if name == INPUT:
            raise ValueError(f"capture_modules: {INPUT!r} is the input capture point (layers=[{INPUT!r}]); "
                             "give the module's capture another name")
        if not isinstance(spec, str):
            raise TypeError(f"capture_modules[{name!r}] must be a module path string ('path/to/module' or "
                            f"'path:k'), got {type(spec).__name__}")
        parsed[name] = parse_spec(spec)
    seen: dict[tuple[str, int], str] = {}
    for name, (path, k) in parsed.items():
        key = (path.replace(".", SEP), k)
        if key in seen:
            raise ValueError(f"capture_modules: {seen[key]!r} and {name!r} name the same call "
                             f"{path!r}:{k}; each activation can be captured once")
        seen[key] = name
    return parsed


def path_name(path: Sequence[str], k: int = 0) -> str:
    """The spec of call ``k`` of the module at ``path``: ``"a/b"`` for k = 0, else ``"a/b:k"``."""
    joined = SEP.join(path)
    return joined if k == 0 else f"{joined}:{k}"


# --------------------------------------------------------------------------- interception


class CallLog:
    """Every submodule ``__call__`` of one forward pass, in call order (a call is listed when it starts).

    ``calls[i] = (path, k, ShapeDtypeStruct of the first element or None)``; ``counts[path]`` is how
    many times the module at ``path`` was called.
    """

    def __init__(self):
        self.calls: list[tuple[tuple[str, ...], int, jax.ShapeDtypeStruct | None]] = []
        self.counts: dict[tuple[str, ...], int] = {}
        self.active: list[tuple[str, ...]] = []

    def paths(self) -> list[str]:
        """The called paths joined by "/", first call order, each once."""
        return list(dict.fromkeys(SEP.join(path) for path, _, _ in self.calls))


def _match(specs: Mapping[str, tuple[str, int]], path: tuple[str, ...], k: int) -> list[str]:
    """The capture names whose spec names call ``k`` of ``path`` ("/" join, or "." join)."""
    spelled = {SEP.join(path), ".".join(path)}
    return [name for name, (spec_path, index) in specs.items() if index == k and spec_path in spelled]


class Capturer:
    """Capture by path for one forward pass: logs every submodule call (``log``) and, at the calls that
    ``specs`` name, records the output's first-element shape (``reached``) and adds the perturbation.

    ``specs``: ``parse_capture_modules``'s ``{name: (path, k)}``; ``perturbations``: ``{name: array}``
    or ``None`` (record only). Framework-neutral: ``linen_interceptor`` plugs it into
    ``nn.intercept_methods``, ``jax_impl.nnx`` into hooked module classes.
    """

    def __init__(self, specs: Mapping[str, tuple[str, int]],
                 perturbations: Mapping[str, jax.Array] | None = None):
        self.specs, self.perturbations = dict(specs), perturbations
        self.log = CallLog()
        self.reached: dict[str, jax.ShapeDtypeStruct] = {}

    def call(self, path: tuple[str, ...], owner: str, next_fun: Callable[..., Any], *args, **kwargs) -> Any:
        """``next_fun(*args, **kwargs)``, the ``__call__`` of the module at ``path`` (class ``owner``),
        logged and, when captured, with the perturbation added to its output's first element."""
        log = self.log
        if not path or path in log.active:  # the root, or a re-entrant call of a module already running
            return next_fun(*args, **kwargs)
        k = log.counts.get(path, 0)
        log.counts[path] = k + 1
        slot = len(log.calls)
        log.calls.append((path, k, None))
        log.active.append(path)
        try:
            output = next_fun(*args, **kwargs)
        finally:
            log.active.pop()
        first = first_element(output)
        shape = None if first is None else jax.ShapeDtypeStruct(first.shape, first.dtype)
        log.calls[slot] = (path, k, shape)
        names = _match(self.specs, path, k)
        if not names:
            return output
        if len(names) > 1 or names[0] in self.reached:
            raise ValueError(f"capture_modules: {names[0]!r} matches more than one module call (one is "
                             f"{path_name(path, k)!r}); spell its path with '/'")
        name = names[0]
        if first is None:
            raise TypeError(f"capture {name!r}: module {path_name(path)!r} ({owner}) returns "
                            f"{type(output).__name__} whose first element is not an array; capture one of "
                            "its submodules instead")
        several = _array_fields(output)
        if len(several) > 1:
            # As torch_ref does: the model may read any of the fields (a BertModel's pooler_output
            # beside last_hidden_state), so perturbing the first could leave the loss unchanged: a silent 0.
            raise TypeError(f"capture {name!r}: module {path_name(path)!r} ({owner}) returns a "
                            f"{type(output).__name__} with several array fields {several} (which one is "
                            "read is not known); capture the submodule that computes the one you mean")
        self.reached[name] = shape
        if self.perturbations is None:
            return output
        p = self.perturbations[name]
        if tuple(p.shape) != tuple(first.shape):
            raise ValueError(f"capture {name!r}: perturbation of shape {tuple(p.shape)} for the output of "
                             f"{path_name(path, k)!r} of shape {tuple(first.shape)}")
        return replace_first(output, first + p)

    def check(self) -> None:
        """After the forward pass: every capture was reached (``check_reached``)."""
        check_reached(self.specs, self.reached, self.log)

    def linen_interceptor(self):
        """The ``nn.intercept_methods`` interceptor: ``call`` for every bound module's ``__call__``."""

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__" or module.scope is None:
                return next_fun(*args, **kwargs)
            path = tuple(str(p) for p in module.path)
            return self.call(path, type(module).__name__, next_fun, *args, **kwargs)

        return interceptor


def check_reached(specs: Mapping[str, tuple[str, int]], reached: Mapping[str, Any], log: CallLog) -> None:
    """Raise a one-line ``ValueError`` for the first capture whose module call did not happen.

    A path called fewer than k+1 times names how many calls there were; a path never called lists the
    nearest paths that were (``difflib.get_close_matches``).
    """
    for name, (path, k) in specs.items():
        if name in reached:
            continue
        counts = {SEP.join(p): n for p, n in log.counts.items()}
        counts.update({".".join(p): n for p, n in log.counts.items() if ".".join(p) not in counts})
        if path in counts:
            n = counts[path]
            raise ValueError(f"capture {name!r}: module {path!r} was called {n} time(s) in the forward pass "
                             f"(calls 0..{n - 1}); '{path}:{k}' asks for call {k} (0-based)")
        called = log.paths()
        near = difflib.get_close_matches(path.replace(".", SEP), called, n=5, cutoff=0.5) or called[:8]
        raise ValueError(f"capture {name!r}: no module at path {path!r} was called in the forward pass; "
                         f"nearest called paths: {near} (jax_impl.capture_points(model, x) lists them all)")


@dataclasses.dataclass(frozen=True)
class Probe:
    """What one abstract forward pass (``jax.eval_shape``) found: the shapes of the ``capture()`` points
    (``{"block/relu": ShapeDtypeStruct}``), of the ``capture_modules`` points, and every module call."""

    capture_shapes: dict[str, jax.ShapeDtypeStruct]
    path_shapes: dict[str, jax.ShapeDtypeStruct]
    log: CallLog


def probe(run: Runner, params: Any, model_state: Mapping | None, x: Any, mutable: Sequence[str] = (),
          capture_modules: Mapping[str, str] | None = None, *, with_collections: bool = True) -> Probe:
    """Trace one forward pass (no compute, free under ``jit``) and check every capture point.

    Raises a one-line ``ValueError`` for a ``capture(self, name, ...)`` point reached more than once
    (one name, two activations: its gradient would be the sum of both), for a ``capture_modules`` spec
    whose call did not happen, and for a name used both by ``capture()`` and by ``capture_modules``.
    ``with_collections=False`` (Hugging Face models) skips the ``"perturbations"`` collection.
    """
    specs = parse_capture_modules(capture_modules)
    capturer = Capturer(specs)
    state = {k: v for k, v in (model_state or {}).items() if k not in (PERTURBATIONS, INTERMEDIATES)}

    def traced(p, s, inputs):
        with nn.intercept_methods(capturer.linen_interceptor()):
            if not with_collections:
                run(p, s, None, inputs, ())
                return {}, {}
            _, new = run(p, s, None, inputs, [PERTURBATIONS, INTERMEDIATES, *mutable])
        return new.get(PERTURBATIONS, {}), new.get(INTERMEDIATES, {})

    perturbations, intermediates = jax.eval_shape(traced, params, state, x)
    capturer.check()
    capture_shapes = traverse_util.flatten_dict(perturbations, sep=SEP)
    check_capture_names(capture_shapes, traverse_util.flatten_dict(intermediates, sep=SEP), specs)
    return Probe(dict(capture_shapes), {name: capturer.reached[name] for name in specs}, capturer.log)


def check_capture_names(capture_names: Sequence[str], sown: Mapping[str, Any],
                        specs: Mapping[str, Any]) -> None:
    """Raise a one-line ``ValueError`` for a ``capture()`` point sown more than once in one forward pass
    (``sown[name]`` a tuple of 2+ activations: its gradient would be the sum over both), or a name
    used both by ``capture()`` and by ``capture_modules``."""
    for name in capture_names:
        if isinstance(sown.get(name), tuple) and len(sown[name]) > 1:
            raise ValueError(f"capture point {name!r} was reached {len(sown[name])} times in one forward "
                             "pass (capture() called twice with one name, or its module called twice); its "
                             "gradient would be the sum over both activations: give each activation its own "
                             "name")
    both = sorted(set(capture_names) & set(specs))
    if both:
        raise ValueError(f"capture name(s) {both} are both capture() points of the model and keys of "
                         "capture_modules; rename the capture_modules entries")


def intercepted(run: Runner, capture_modules: Mapping[str, str] | None) -> Callable[..., tuple[Any, Any]]:
    """``run`` with the ``capture_modules`` points perturbed: ``(params, state, perturbations, x, mutable)
    -> (outputs, new collections)``, where ``perturbations`` is the flat ``{capture name: array}`` dict
    of all capture points (``capture()`` ones go to the ``"perturbations"`` collection)."""
    specs = parse_capture_modules(capture_modules)

    def forward(params, model_state, perturbations, x, mutable):
        by_path = {name: perturbations[name] for name in specs}
        rest = {name: v for name, v in perturbations.items() if name not in specs}
        tree = traverse_util.unflatten_dict(rest, sep=SEP)
        if not specs:
            return run(params, model_state, tree, x, mutable)
        capturer = Capturer(specs, by_path)
        with nn.intercept_methods(capturer.linen_interceptor()):
            result = run(params, model_state, tree, x, mutable)
        capturer.check()
        return result

    return forward


def _iter_points(log: CallLog) -> Iterator[tuple[str, jax.ShapeDtypeStruct]]:
    for path, k, shape in log.calls:
        if shape is not None:
            yield path_name(path, k), shape


def capture_points(
    model: Any,
    x: Any,
    params: Any = None,
    *,
    model_state: Mapping | None = None,
    mutable: Sequence[str] = (),
    apply_kwargs: Mapping | None = None,
    rngs: Any = None,
) -> dict[str, tuple[int, ...]]:
    """Every capture point of ``model`` at the batch ``x``: ``{name: output shape}``, in call order.

    Lists each submodule call whose output (or its first element) is an array, by path as
    ``capture_modules`` takes it (``"bert/encoder/layer/0"``; ``"relu:1"`` for the second call of a
    reused module), then the model's own ``capture()`` points (``"relu1"``). E.g. for ``jax_impl.Net``
    at (B, 32, 32, 3): ``{"conv1": (B, 28, 28, 32), "conv2": (B, 10, 10, 64), "linear": (B, 10),
    "relu1": (B, 14, 14, 32), "relu2": (B, 5, 5, 64)}``.

    ``model``, ``x``, ``model_state``, ``mutable``: as in ``penalized_loss``. ``params`` ``None``:
    the shapes of ``model.init`` (a Linen module) or ``model.params`` (a Hugging Face model); nothing
    is computed either way (``jax.eval_shape``).
    """
    hf = is_hf_model(model)
    if params is None:
        if hf:
            params = model.params
        elif isinstance(model, nn.Module):
            variables = jax.eval_shape(lambda: call_with_inputs(model.init, x, jax.random.key(0)))
            params = variables["params"]
            if model_state is None:
                model_state = {k: v for k, v in variables.items()
                               if k not in ("params", PERTURBATIONS, INTERMEDIATES)}
        else:
            raise ValueError("capture_points: pass params for an apply function (only a Linen Module can "
                             "be initialised here)")
    found = probe(runner(model, apply_kwargs=apply_kwargs, rngs=rngs), params, model_state, x, mutable,
                  with_collections=not hf)
    points = dict(_iter_points(found.log))
    points.update(found.capture_shapes)
    return {name: tuple(s.shape) for name, s in points.items()}
