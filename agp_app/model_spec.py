"""``--model`` and ``--model-args``: which network a training CLI builds (framework-free).

``--model`` is a built-in name (``cnn``, the seed answer's two-conv network; ``resnet18``, the
CIFAR-style ResNet-18) or ``pkg.module:Name``, the user's own class or factory function, imported
from ``sys.path`` (``python -m`` puts the current folder first). ``--model-args`` is a JSON object
of keywords for it (``'{"width": 64}'``). Each framework's CLI gives ``build_model`` its registry of
built-ins (``agp_app.jax_models.jax_registry``, ``agp_app.torch_models.torch_registry``) and its
model base type (``flax.linen.Module``, ``torch.nn.Module``)::

    spec = parse_model_spec(args.model, args.model_args)
    model = build_model(spec, jax_registry(num_classes), nn.Module, "Flax",
                        data_kwargs={"num_classes": num_classes})

A user's class or factory gets ``**args`` plus each of ``data_kwargs`` (what the data decides:
``num_classes``; for PyTorch also ``in_channels``, ``image_size``) that its signature names and
``--model-args`` does not set.

Training vs evaluation mode (how the trainers call the model):

* Flax: if the module's ``__call__`` has a parameter named ``train``, the trainer passes
  ``train=True`` in the train step and ``train=False`` in evaluation (``agp_app.jax_models.takes_train``);
  if ``init`` created a ``batch_stats`` collection, the train step applies with
  ``mutable=["batch_stats"]`` and keeps the updated statistics in the train state and the
  checkpoints; evaluation uses the running statistics (no mutation). Other collections are not
  supported (dropout's ``rngs`` included).
* PyTorch: ``model.train()`` for the train step, ``model.eval()`` for evaluation; BatchNorm's
  running statistics are buffers, saved with ``state_dict``.

``ModelSpec.to_json`` / ``from_json`` are the form config.json records (``{"name", "args"}``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: ``--model`` built-in names.
BUILTIN_MODELS = ("cnn", "resnet18")
#: ``pkg.module:Name`` (dotted module path, one attribute name).
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_USAGE = "--model must be cnn, resnet18 or pkg.module:Name (your class or factory function)"


@dataclass(frozen=True)
class ModelSpec:
    """The network to build: ``name`` (built-in or ``pkg.module:Name``) and its keyword ``args``."""

    name: str = "cnn"
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in BUILTIN_MODELS and not _IMPORT_PATH.match(self.name):
            raise ValueError(f"{_USAGE}; got {self.name!r}")
        if not isinstance(self.args, dict) or not all(isinstance(k, str) for k in self.args):
            raise ValueError(f"--model-args must be a JSON object; got {self.args!r}")
        try:
            json.dumps(self.args, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--model-args must be JSON-serialisable ({e}); got {self.args!r}") from None

    def __hash__(self) -> int:  # a dict field: hash its canonical JSON (specs equal -> hashes equal)
        return hash((self.name, json.dumps(self.args, sort_keys=True)))

    @property
    def is_builtin(self) -> bool:
        return self.name in BUILTIN_MODELS

    def __str__(self) -> str:
        return self.name + (f" {json.dumps(self.args, sort_keys=True)}" if self.args else "")

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., "args": {...}}`` for config.json."""
        return {"name": self.name, "args": dict(self.args)}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> ModelSpec:
        """Inverse of ``to_json``; ``ValueError`` for anything else."""
        if not isinstance(record, Mapping) or set(record) != {"name", "args"}:
            raise ValueError(f"a model record must be {{'name': ..., 'args': {{...}}}}; got {record!r}")
        args = record["args"]
        return cls(record["name"], dict(args) if isinstance(args, Mapping) else args)


#: ``--model`` when not given: the answer's CNN.
DEFAULT_MODEL = ModelSpec()


def parse_json_object(text: str | None, flag: str, example: str = '{"width": 64}') -> dict[str, Any]:
    """A flag's JSON object text (``None``/"" for none -> ``{}``); one-line ``ValueError`` otherwise.

    The one reader of JSON-object flags: ``--model-args`` here, the verifier's ``--torch-kwargs``,
    ``--flax-kwargs``, ``--flax-apply-kwargs`` and ``--name-map``.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be a JSON object such as '{example}' ({e.msg} at character {e.pos}); "
                         f"got {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object such as '{example}'; got {text!r}")
    return value


def parse_model_spec(model: str, model_args: str | None = None) -> ModelSpec:
    """``--model`` and ``--model-args`` (JSON object text, or None/"" for none) -> ``ModelSpec``."""
    return ModelSpec(model, parse_json_object(model_args, "--model-args"))


def import_object(path: str, what: str = "--model") -> Any:
    """The object ``pkg.module:Name`` names (``Name`` may be dotted: ``Outer.factory``).

    The one importer of the user's models, for the training CLIs and the verifier. Every failure is
    one ``ValueError`` line that starts with ``what`` (the flag or argument) and ``path``: a
    malformed path, a module that cannot be found, a module that fails while it is imported
    (SyntaxError, a missing dependency, any exception), a missing attribute.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {path!r}: expected 'package.module:Name' (a class or a function "
                         "returning a model)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):  # the module itself, not a dependency
            raise ValueError(f"{what} {path}: cannot import module {module_name!r} ({e}); run from the "
                             "folder that holds it, or set PYTHONPATH") from e
        raise ValueError(f"{what} {path}: importing module {module_name!r} failed: {e}") from e
    except SyntaxError as e:
        raise ValueError(f"{what} {path}: importing module {module_name!r} failed: SyntaxError: {e.msg} "
                         f"({e.filename}, line {e.lineno})") from e
    except Exception as e:  # the user's module raised while it was imported
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{what} {path}: importing module {module_name!r} failed: "
                         f"{type(e).__name__}: {first}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path}: module {module_name!r} "
                             f"({getattr(module, '__file__', '?')}) has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _accepted(constructor: Callable, names: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``names`` that ``constructor``'s signature takes by keyword (all if ``**kwargs``)."""
    try:
        params = inspect.signature(constructor).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins): pass nothing extra
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(names)
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: v for k, v in names.items() if k in params and params[k].kind in keyword}


def _check_keywords(spec: ModelSpec, constructor: Callable, kwargs: Mapping[str, Any]) -> None:
    """``TypeError`` naming ``--model-args`` when ``constructor``'s signature does not take ``kwargs``."""
    try:
        signature = inspect.signature(constructor)
    except (TypeError, ValueError):  # no signature to read: the call itself will tell
        return
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        takes = ", ".join(n for n, p in signature.parameters.items() if p.kind is not p.VAR_POSITIONAL)
        given = json.dumps(dict(kwargs), sort_keys=True, default=str)
        raise TypeError(f"--model {spec.name} cannot be built with the keywords {given}: {e} (it takes: "
                        f"{takes}); fix --model-args") from None


def _user_constructor(spec: ModelSpec, base_type: type, framework_name: str) -> Callable:
    obj = import_object(spec.name)
    what = f"a {framework_name} model ({base_type.__module__}.{base_type.__qualname__})"
    if isinstance(obj, type):
        if not issubclass(obj, base_type):
            raise ValueError(f"--model {spec.name}: class {obj.__qualname__} is not a subclass of "
                             f"{base_type.__qualname__}; name {what} class or a function returning one")
        return obj
    if isinstance(obj, base_type):
        raise ValueError(f"--model {spec.name}: names a model instance; name its class or a function that "
                         "builds it (so --model-args can reach it)")
    if not callable(obj):
        raise ValueError(f"--model {spec.name}: is a {type(obj).__name__}, neither a class nor a function; "
                         f"name {what} class or a function returning one")
    return obj


def _as_tuples(value: Any) -> Any:
    """A JSON value with every array as a tuple, recursively (objects stay dicts).

    For ``--model-args``: a Flax module's attributes must hash (a ``list`` field such as
    ``"blocks": [1, 1]`` makes its jitted steps fail), and tuples are what model constructors
    declare for sequences (``blocks: tuple[int, ...]``).
    """
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_tuples(v) for k, v in value.items()}
    return value


def build_model(spec: ModelSpec, registry: Mapping[str, Callable[..., Any]], base_type: type,
                framework_name: str, data_kwargs: Mapping[str, Any] | None = None) -> Any:
    """Build the network ``spec`` names (module docstring).

    ``registry`` maps built-in names to constructors taking ``**spec.args`` (the caller binds the
    data's sizes, e.g. ``functools.partial(ResNet18, num_classes=10)``). ``base_type`` is the type
    the result must have. ``ValueError`` (one line) for an unknown built-in, an object that cannot
    be imported or is not a model class/factory, a constructor that raises, or a result of the
    wrong type; ``TypeError`` naming ``--model-args`` for keywords the constructor does not take.
    """
    if spec.is_builtin:
        if spec.name not in registry:
            raise ValueError(f"--model {spec.name} is not available for {framework_name}; choose one of "
                             f"{', '.join(registry)} or pkg.module:Name")
        constructor, kwargs = registry[spec.name], _as_tuples(spec.args)
    else:
        constructor = _user_constructor(spec, base_type, framework_name)
        from_data = {k: v for k, v in (data_kwargs or {}).items() if k not in spec.args}
        kwargs = {**_accepted(constructor, from_data), **_as_tuples(spec.args)}
    _check_keywords(spec, constructor, kwargs)
    try:
        model = constructor(**kwargs)
    except Exception as e:
        given = json.dumps(kwargs, sort_keys=True, default=str)
        raise ValueError(f"--model {spec.name}: building it with {given} raised "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(model, base_type):
        raise ValueError(f"--model {spec.name} built a {type(model).__module__}.{type(model).__qualname__}, "
                         f"expected a {framework_name} model ({base_type.__qualname__})")
    return model
