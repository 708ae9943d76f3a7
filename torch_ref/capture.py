"""Capture points of any ``nn.Module`` by module path (forward hooks), and how a model is called.

A capture spec maps a capture name to the submodule whose *output* is the
activation, by its ``named_modules()`` path, optionally with ``:k`` for the
k-th call (0-based) of that module in one forward pass (for modules reused in
``forward``, like the seed ``Net``'s single ``self.relu``)::

    NET_CAPTURE_MODULES = {"relu1": "relu:0", "relu2": "relu:1"}

    with CaptureHooks(model, {"relu1": "act1"}) as hooks:
        logits = model(x)
    hooks.captured["relu1"]   # the output of model.act1, still in the graph

``capture_points(model, x)`` lists every path that can be captured, with its
output shape. A spec that is not a submodule path may name an attribute that
``forward`` stores (``{"relu1": "relu1"}`` for the seed answer's ``Net``,
which sets ``self.relu1``); it is read after the forward pass.

Outputs as real models have them: a module returning a tuple or list
(Hugging Face layers return ``(hidden_states, attentions, ...)``)
contributes its first element; a dict-like output (a ``transformers``
``ModelOutput``, a ``dict``) or a dataclass contributes its first field
(``ModelOutput`` skips fields that are ``None``) when it is the output's
only tensor (a ``BertModel``'s output also holds ``pooler_output``, which
the classifier reads instead). Anything else is a ``TypeError`` naming the
module.

Perturbations: with ``perturb=True`` a hooked capture point's output ``a``
is replaced by ``a + z``, ``z`` a zero leaf tensor (``requires_grad``) of
``a``'s shape, and ``d loss / d z = d loss / d a`` is taken with respect to
``z`` (``forward_with_perturbations``). This stays right when a later op
modifies the tensor in place (``ReLU(inplace=True)`` right after a
``BatchNorm``, as in timm's ResNets): differentiating with respect to ``a``
itself would give the gradient at the *modified* tensor, a wrong penalty
without an error. ``jax_impl`` does the same with its ``perturb``
collection. ``shifts`` adds a given tensor instead (finite differences).

Inputs as real models have them (``call_model``): a tensor ``x`` is passed
as ``model(x)``, a tuple as positional inputs ``model(*x)``, a dict as
keyword inputs ``model(**x)`` (``input_ids``, ``attention_mask``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

from agp_common.penalty_spec import INPUT

#: Capture spec of ``torch_ref.Net``: its one ``ReLU`` module is called twice.
NET_CAPTURE_MODULES = {"relu1": "relu:0", "relu2": "relu:1"}


def call_model(model: Callable[..., Any], x: Any) -> Any:
    """``model(**x)`` for a dict (keyword inputs), ``model(*x)`` for a tuple (positional), or ``model(x)``."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def parse_capture_spec(spec: str) -> tuple[str, int]:
    """``"block.act"`` -> ("block.act", 0); ``"relu:1"`` -> ("relu", 1)."""
    if not isinstance(spec, str):
        raise TypeError(f"capture spec {spec!r}: expected a string 'module.path' or 'module.path:k', "
                        f"got {type(spec).__name__}")
    path, sep, index = spec.partition(":")
    if not sep:
        return path, 0
    if not index.isdigit():
        raise ValueError(f"capture spec {spec!r}: expected 'module.path' or 'module.path:k' with k >= 0")
    return path, int(index)


def point_name(path: str, index: int) -> str:
    """The spec of the ``index``-th call of ``path``: ``"path"`` for the first, ``"path:k"`` after."""
    return path if index == 0 else f"{path}:{index}"


def check_capture_modules(
    capture_modules: Mapping[str, str], module_paths: Collection[str] = ()
) -> dict[tuple[str, int], str]:
    """``{(path, k): capture name}`` of a capture spec, or a one-line error.

    A Flax-style path (``"bert/encoder/layer/0"``, as ``jax_impl`` spells it)
    is read as its ``"."`` form when that is one of ``module_paths``. Refused:
    a spec that is not a mapping (``TypeError``); an empty one (there would be
    nothing to penalise); a capture named ``"input"`` (reserved for the input
    itself: put ``"input"`` in ``layers``); two names for the same call of the
    same module (``{"a": "2", "b": "2:0"}``).
    """
    if not isinstance(capture_modules, Mapping):
        raise TypeError(f"capture_modules must be a dict {{capture name: 'module.path[:k]'}}, got "
                        f"{type(capture_modules).__name__}")
    if not capture_modules:
        raise ValueError("capture_modules is empty: nothing to penalise; name at least one submodule, e.g. "
                         "{'act': 'layer1.relu'} (torch_ref.capture_points(model, x) lists them)")
    by_call: dict[tuple[str, int], str] = {}
    for name, spec in capture_modules.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"capture names must be non-empty strings, got {name!r}")
        if name == INPUT:
            raise ValueError(f"capture name {INPUT!r} is reserved for the model's input; put {INPUT!r} in "
                             f"layers to penalise the input gradient, and rename capture {spec!r}")
        key = parse_capture_spec(spec)
        dotted = key[0].replace("/", ".")
        if key[0] not in module_paths and dotted in module_paths:
            key = (dotted, key[1])
        if key in by_call:
            raise ValueError(f"captures {by_call[key]!r} and {name!r} both name {point_name(*key)!r} (call "
                             f"{key[1]} of module {key[0]!r}); give each module call one capture name")
        by_call[key] = name
    return by_call


def unknown_path_error(name: str, path: str, paths: list[str], extra: str = "") -> ValueError:
    """One line naming the submodule paths nearest to ``path`` (``difflib``)."""
    nearest = difflib.get_close_matches(path, paths, n=5, cutoff=0.5)
    hint = f"nearest paths: {nearest}" if nearest else "no path is close"
    return ValueError(f"capture {name!r}: no submodule {path!r}{extra}; {hint} "
                      "(torch_ref.capture_points(model, x) lists every capture point)")


def _first_field(output: Any) -> tuple[torch.Tensor | None, Callable[[Any], Any] | None, str | None]:
    """``(tensor, rebuild, problem)``: the tensor a capture of ``output`` means, how to put a new one back.

    Tensor: itself. Tuple/list (also named tuples): element 0. Mapping
    (``ModelOutput``, ``dict``) or dataclass: the first field, when it is the
    only tensor field (the model may read any of several, e.g. a ``BertModel``'s
    ``pooler_output`` beside ``last_hidden_state``: perturbing the first would
    then change nothing the loss sees). ``rebuild(new)`` is the output with
    that tensor replaced. Otherwise ``(None, None, problem)``, a phrase for
    the error message.
    """
    kind = type(output).__name__
    if isinstance(output, torch.Tensor):
        return output, lambda new: new, None
    if isinstance(output, tuple | list):
        if not output or not isinstance(output[0], torch.Tensor):
            first = type(output[0]).__name__ if output else "nothing"
            return None, None, f"a {kind} whose first element is {first}, not a tensor"
        if isinstance(output, list):
            return output[0], lambda new: [new, *output[1:]], None
        if hasattr(output, "_fields"):  # a named tuple takes its fields as arguments
            return output[0], lambda new: type(output)(new, *output[1:]), None
        return output[0], lambda new: type(output)((new, *output[1:])), None
    if isinstance(output, Mapping):
        fields = dict(output.items())
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    else:
        return None, None, f"a {kind}, not a tensor"
    tensors = [key for key, value in fields.items() if isinstance(value, torch.Tensor)]
    if not fields or not isinstance(next(iter(fields.values())), torch.Tensor):
        return None, None, f"a {kind} whose first field is not a tensor"
    if len(tensors) > 1:
        return None, None, f"a {kind} with several tensor fields {tensors} (which one is read is not known)"
    key = tensors[0]
    if isinstance(output, Mapping):
        def rebuild(new):
            out = copy.copy(output)  # a ModelOutput stays a ModelOutput (its __setitem__ sets the attribute)
            out[key] = new
            return out
    else:
        def rebuild(new):
            return dataclasses.replace(output, **{key: new})
    return fields[key], rebuild, None


def primary_output(output: Any) -> torch.Tensor | None:
    """The tensor a capture of this output means (``_first_field``), or None when there is none."""
    value, _, _ = _first_field(output)
    return value


def output_logits(output: Any) -> torch.Tensor | None:
    """What the default loss reads: ``output.logits`` (Hugging Face), element 0 of a tuple/list, the tensor.

    None when the output is none of these (then pass a ``loss_fn`` that takes the raw output).
    """
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output if isinstance(output, torch.Tensor) else None


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module):
    """An extra forward pass that does not update BatchNorm running stats (still uses batch stats).

    In train mode ``_BatchNorm`` passes ``None`` running stats to the kernel when
    ``track_running_stats`` is False, so the batch is normalised exactly as
    before but nothing is updated. (Restoring the buffers afterwards instead
    would bump their version and break the first pass's backward.)
    """
    frozen = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in frozen:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True


def capture_points(model: nn.Module, x: Any) -> dict[str, tuple[int, ...]]:
    """``{capture spec: output shape}`` of every submodule called in one forward pass, in call order.

    One forward pass under ``torch.no_grad()`` (BatchNorm running statistics
    are left unchanged); ``x`` as in ``call_model`` (tensor, tuple of
    positional inputs, dict of keyword inputs). The keys are the specs
    ``capture_modules`` takes: ``"path"`` for a module's first call,
    ``"path:k"`` for its (k+1)-th (a reused module, ``"relu:1"``). The order
    is the order in which the modules are *called* (a block before its
    children). The shape is that of the tensor a capture means: element 0 of
    a tuple/list output, the first field of a ``ModelOutput``; modules whose
    output holds no such tensor (a module returning ``None``, a tuple of
    tuples) are left out, as is the root module itself. Last come the
    activations a model stores itself and names with a ``captures()`` method
    (``torch_ref.Net``: ``relu1``, ``relu2``), as ``jax_impl.capture_points``
    lists a Flax model's ``capture()`` points after its module calls.
    """
    modules = [(path, m) for path, m in model.named_modules() if path]
    order: list[tuple[str, int]] = []
    shapes: dict[tuple[str, int], tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    pending: dict[str, list[int]] = {}

    def pre_hook(path):
        def hook(module, inputs):
            index = calls.get(path, 0)
            calls[path] = index + 1
            pending.setdefault(path, []).append(index)
            order.append((path, index))

        return hook

    def post_hook(path):
        def hook(module, inputs, output):
            index = pending[path].pop()
            value = primary_output(output)
            if value is not None:
                shapes[(path, index)] = tuple(value.shape)

        return hook

    handles = []
    try:
        for path, module in modules:
            handles.append(module.register_forward_pre_hook(pre_hook(path)))
            handles.append(module.register_forward_hook(post_hook(path)))
        with torch.no_grad(), running_stats_frozen(model):
            call_model(model, x)
    finally:
        for handle in handles:
            handle.remove()
    points = {point_name(*key): shapes[key] for key in order if key in shapes}
    if callable(getattr(model, "captures", None)):
        for name, value in model.captures().items():
            if isinstance(value, torch.Tensor):
                points.setdefault(name, tuple(value.shape))
    return points


class CaptureHooks:
    """Context manager that records (and optionally perturbs or shifts) named module outputs during forward.

    Args:
      model: any ``nn.Module``.
      capture_modules: ``{capture name: "module.path" or "module.path:k"}``
        (checked by ``check_capture_modules``; every path must be a submodule).
      shifts: optional ``{capture name: tensor}`` added to that output.
      perturb: add a zero leaf tensor ``z`` (``requires_grad``) to every other
        captured output; ``perturbations[name]`` is ``z``, the tensor to
        differentiate with respect to (module docstring).

    After the forward pass, ``captured`` maps every capture name to its tensor
    (the first element of a tuple output, after the shift or ``z``: exactly
    what the rest of the network consumes); ``check_complete`` raises for a
    name whose module was not called (often enough).
    """

    def __init__(
        self,
        model: nn.Module,
        capture_modules: Mapping[str, str],
        shifts: Mapping[str, torch.Tensor] | None = None,
        *,
        perturb: bool = False,
    ):
        modules = dict(model.named_modules())
        self._by_call = check_capture_modules(capture_modules, modules)
        paths = [p for p in modules if p]
        for (path, _), name in self._by_call.items():
            if path not in modules:
                raise unknown_path_error(name, path, paths)
        self._modules = {path: modules[path] for path, _ in self._by_call}
        self._shifts = dict(shifts or {})
        self._perturb = perturb
        self._names = tuple(capture_modules)
        self._handles: list = []
        self._calls: dict[str, int] = {}
        self.captured: dict[str, torch.Tensor] = {}
        self.perturbations: dict[str, torch.Tensor] = {}

    def _hook(self, path: str):
        def hook(module, inputs, output):
            index = self._calls.get(path, 0)
            self._calls[path] = index + 1
            name = self._by_call.get((path, index))
            if name is None:
                return None
            value, rebuild, problem = _first_field(output)
            if problem is not None:
                raise TypeError(
                    f"capture {name!r}: module {point_name(path, index)!r} ({type(module).__name__}) "
                    f"returned {problem}; capture the submodule that computes the tensor you mean "
                    "(torch_ref.capture_points(model, x) lists them)")
            if name in self._shifts:
                z = self._shifts[name]
            elif self._perturb:
                if not value.is_floating_point():
                    raise TypeError(f"capture {name!r}: module {point_name(path, index)!r} returned a "
                                    f"{value.dtype} tensor; only floating-point activations have a gradient")
                z = torch.zeros_like(value, requires_grad=True)
            else:
                self.captured[name] = value
                return None
            self.perturbations[name] = z
            value = value + z  # a new tensor: in-place ops later change it, never the graph up to z
            self.captured[name] = value
            return rebuild(value)

        return hook

    def __enter__(self) -> CaptureHooks:
        self._calls.clear()
        self.captured.clear()
        self.perturbations.clear()
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in self._modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def check_complete(self) -> dict[str, torch.Tensor]:
        """The captures in spec order; raises if a capture point was not reached."""
        missing = [n for n in self._names if n not in self.captured]
        if missing:
            raise ValueError(f"capture point(s) {missing} were not reached in forward (module not called "
                             "often enough; torch_ref.capture_points(model, x) lists the calls)")
        return {n: self.captured[n] for n in self._names}


def forward_with_perturbations(
    model: nn.Module,
    input: Any,
    capture_modules: Mapping[str, str],
    shifts: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(output, {name: activation}, {name: tensor to differentiate})`` of one forward pass.

    Hooked capture points are perturbed (``CaptureHooks(perturb=True)``): the
    tensor to differentiate is the zero leaf ``z``, ``d loss / d z = d loss /
    d a``; with ``shifts`` the shift is added instead (and is returned in its
    place). A spec that names no submodule (and has no ``:k``) is read as an
    attribute that ``forward`` stores (``self.relu1 = ...``, the seed
    answer's ``Net``) after the pass: for those the activation itself is the
    tensor to differentiate, as in the seed answer, and it cannot be shifted.
    ``input`` as in ``call_model``.
    """
    modules = dict(model.named_modules())
    by_call = check_capture_modules(capture_modules, modules)
    stored = {name: path for (path, _), name in by_call.items()
              if path not in modules and ":" not in capture_modules[name]}
    hooked = {name: point_name(*key) for key, name in by_call.items() if name not in stored}
    shifted_stored = sorted(set(shifts or {}) & set(stored))
    if shifted_stored:
        raise ValueError(f"capture point(s) {shifted_stored} are attributes stored by forward, which cannot "
                         "be shifted; name the module whose output they are "
                         "(capture_modules={name: 'module.path'})")
    if hooked:
        with CaptureHooks(model, hooked, shifts, perturb=True) as hooks:
            output = call_model(model, input)
        captured, wrt = hooks.check_complete(), dict(hooks.perturbations)
    else:
        output = call_model(model, input)
        captured, wrt = {}, {}
    paths = [p for p in modules if p]
    for name, spec in stored.items():
        value = getattr(model, spec, None)
        if not isinstance(value, torch.Tensor):
            raise unknown_path_error(name, spec, paths, extra=f" and forward stored no tensor self.{spec}")
        captured[name] = wrt[name] = value
    order = list(capture_modules)
    return output, {n: captured[n] for n in order}, {n: wrt[n] for n in order}


def forward_with_captures(
    model: nn.Module,
    input: Any,
    capture_modules: Mapping[str, str],
    shifts: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``model(input)`` and ``{capture name: activation}`` (``forward_with_perturbations`` less ``wrt``).

    The activations of hooked capture points are ``a + z`` with ``z`` a zero
    leaf (or ``a + shift``); to differentiate with respect to a capture point
    use ``forward_with_perturbations``' third result.
    """
    output, captured, _ = forward_with_perturbations(model, input, capture_modules, shifts)
    return output, captured
