"""Package namespaces whose names are imported on first use (PEP 562 module ``__getattr__``).

``import jax_impl`` or ``import torch_ref`` then costs nothing until a name is used: JAX, Flax
and PyTorch load when the first model or function is asked for. That keeps the package import
light for ``python -m jax_impl.train`` (Python imports the package before the entry point runs,
and the entry point must be running to turn a Ctrl-C during the heavy imports into one line),
and ``from jax_impl import Net`` works as before::

    __getattr__, __dir__ = lazy_exports(__name__, {"Net": "jax_impl.model", ...})

A name that is not exported but names a submodule (``jax_impl.nnx``) imports that submodule.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to its module."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module), name)
            sys.modules[package].__dict__[name] = value  # found once: later lookups skip __getattr__
            return value
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*exports, *importlib.import_module(package).__dict__})

    return __getattr__, __dir__
