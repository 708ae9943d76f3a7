"""Which activations the penalty differentiates, named once for both frameworks.

A capture has a name (the row ``dL/da[name]``), a PyTorch spec and a Flax spec:

* PyTorch: a submodule path whose output is the activation (``"layer1.0.bn1"``, forward hooks),
  ``"path:k"`` for its k-th call, or an attribute that ``forward`` stores (``"relu1"``);
  passed to ``torch_ref.penalized_loss(capture_modules=)``.
* Flax: a ``jax_impl.capture(self, name, x)`` point of the twin called ``name``; else the Linen
  module path given after ``@`` (``"layer1.0.bn1@layer1_0/bn1"``); else, by default, the PyTorch
  path with ``"."`` -> ``"/"`` (``"bert.encoder.layer.0"`` -> ``"bert/encoder/layer/0"``, the
  path the converter gives the same layer's weights), captured by module path
  (``jax_impl.penalized_loss(capture_modules=)``).

So ``["bert.encoder.layer.0", "bert.encoder.layer.1"]`` needs no Flax names at all, and
``{"tanh1": "act1"}`` still means a hand-written twin's ``capture(self, "tanh1", ...)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Separates the PyTorch spec from an explicit Flax module path: ``"torch.path@flax/path"``.
FLAX_PATH_SEPARATOR = "@"


@dataclass(frozen=True)
class Capture:
    """One capture point: its name, the PyTorch spec, the explicit Flax module path (or ``None``)."""

    name: str
    torch_spec: str
    flax_path: str | None = None

    def default_flax_path(self) -> str:
        """The PyTorch path with ``"."`` -> ``"/"`` (``"path:k"`` keeps its call index)."""
        path, sep, call = self.torch_spec.partition(":")
        return path.replace(".", "/") + sep + call


def parse_captures(capture_modules: Mapping[str, str] | Sequence[str]) -> tuple[Capture, ...]:
    """``{name: "torch.spec[@flax/path]"}``, or a sequence of PyTorch paths (each its own name).

    Raises:
      ValueError: empty, not strings, an empty part, or a name given twice (a sequence).
    """
    if isinstance(capture_modules, str) or not isinstance(capture_modules, Mapping | Sequence):
        raise ValueError("capture_modules must be a non-empty {name: PyTorch module spec} mapping or a "
                         f"sequence of PyTorch module paths, got {capture_modules!r}")
    items = (list(capture_modules.items()) if isinstance(capture_modules, Mapping)
             else [(spec, spec) for spec in capture_modules])
    if not items:
        raise ValueError("capture_modules is empty: name at least one activation to penalise "
                         "(a PyTorch module path such as 'layer1' or {'name': 'layer1'})")
    captures, seen = [], {}
    for name, spec in items:
        if not (isinstance(name, str) and isinstance(spec, str)):
            raise ValueError(f"capture_modules: names and specs must be strings, got {name!r}: {spec!r}")
        torch_spec, sep, flax_path = spec.partition(FLAX_PATH_SEPARATOR)
        name, torch_spec, flax_path = name.strip(), torch_spec.strip(), flax_path.strip()
        if not name or not torch_spec or (sep and not flax_path):
            raise ValueError(f"capture_modules: expected 'name': 'torch.module.path[:k][@flax/path]', got "
                             f"{name!r}: {spec!r}")
        if name in seen:
            raise ValueError(f"capture name {name!r} is given twice ({seen[name]!r} and {spec!r}); each "
                             "capture needs its own name")
        seen[name] = spec
        captures.append(Capture(name, torch_spec, flax_path or None))
    return tuple(captures)


def torch_capture_modules(captures: Sequence[Capture]) -> dict[str, str]:
    """``torch_ref.penalized_loss(capture_modules=)``: ``{name: PyTorch spec}``."""
    return {c.name: c.torch_spec for c in captures}


def flax_capture_modules(captures: Sequence[Capture], capture_points: Sequence[str]) -> dict[str, str]:
    """``jax_impl.penalized_loss(capture_modules=)``: the captures that are not capture() points of the twin.

    ``capture_points`` are the names the Flax twin marks with ``jax_impl.capture``; a capture
    of that name (without an explicit ``@flax/path``) is that point, the others are taken by
    module path.
    """
    return {c.name: c.flax_path or c.default_flax_path() for c in captures
            if c.flax_path is not None or c.name not in capture_points}


def check_flax_captures(captures: Sequence[Capture], capture_points: Sequence[str],
                        called_paths: Sequence[str]) -> None:
    """One-line ``ValueError`` for a capture that is neither a ``capture()`` point nor a called Flax module.

    ``called_paths`` are the Flax module paths called in a forward pass ("/"-joined).
    """
    called = set(called_paths)
    by_name = {c.name: c for c in captures}
    for name, spec in flax_capture_modules(captures, capture_points).items():
        path, sep, call = spec.rpartition(":")
        path = path if sep and call.isdigit() else spec
        path = path.replace(".", "/").strip("/")
        if path in called:
            continue
        near = difflib.get_close_matches(path, list(called_paths), n=4, cutoff=0.5) or list(called_paths)[:4]
        given = by_name[name].flax_path
        why = (f"the Flax path {given!r} given after '@' names no module it calls" if given else
               f"the Flax twin has no capture() point {name!r} (it has {list(capture_points)}) and calls no "
               f"module at {path!r}")
        raise ValueError(f"capture {name!r}: {why}; nearest Flax module paths: {near}; name the Flax side "
                         f"with '{by_name[name].torch_spec}@flax/module/path'")
