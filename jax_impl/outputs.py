"""Where the activation and the logits sit in a model's or a module's output.

Models and modules written elsewhere do not return one array: a Hugging Face
layer returns ``(hidden_states, ...)``, a Hugging Face model a ``ModelOutput``
dataclass (``outputs.logits``), other code a dict or a named tuple. These
helpers find the one array the library reads and put a new one in its place,
keeping the output's type:

* ``first_element(output)``: the activation a module contributes to a capture
  by path (``jax_impl.module_capture``): the array itself, ``output[0]`` of a
  tuple/list, the first non-None field of a dataclass or value of a mapping.
* ``replace_first(output, value)``: the same output with that element replaced
  (the perturbed activation ``a + p``, same shape ``(B, ...)``).
* ``model_logits(outputs)``: the (B, K) logits the default loss reads:
  ``outputs.logits``, else ``outputs[0]``, else ``outputs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["first_element", "model_logits", "replace_first"]


def _is_array(value: Any) -> bool:
    return isinstance(value, jax.Array | np.ndarray)


def _first_key(output: Any) -> Any:
    """Field name (dataclass) or key (mapping) of ``output``'s first non-None entry, or ``None``."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        for field in dataclasses.fields(output):
            if getattr(output, field.name) is not None:
                return field.name
        return None
    if isinstance(output, Mapping):
        return next((k for k, v in output.items() if v is not None), None)
    return None


def _array_fields(output: Any) -> list[str]:
    """Names of the array fields of a dataclass or mapping output (``[]`` for arrays, tuples, lists)."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [f.name for f in dataclasses.fields(output) if _is_array(getattr(output, f.name))]
    if isinstance(output, Mapping):
        return [str(k) for k, v in output.items() if _is_array(v)]
    return []


def first_element(output: Any) -> Any:
    """The activation a module's output contributes: the output itself if it is an array, else its
    first element (tuple/list: ``output[0]``; dataclass, e.g. a Hugging Face ``ModelOutput``: its first
    non-None field; mapping: its first non-None value). ``None`` when that is not an array."""
    if _is_array(output):
        return output
    if isinstance(output, tuple | list):
        value = output[0] if output else None
    else:
        key = _first_key(output)
        if key is None:
            return None
        value = getattr(output, key) if dataclasses.is_dataclass(output) else output[key]
    return value if _is_array(value) else None


def replace_first(output: Any, value: jax.Array) -> Any:
    """``output`` with its first element (as ``first_element`` finds it) replaced by ``value``."""
    if _is_array(output):
        return value
    if isinstance(output, tuple):
        rest = tuple(output[1:])
        return type(output)(value, *rest) if hasattr(output, "_fields") else (value, *rest)
    if isinstance(output, list):
        return [value, *output[1:]]
    key = _first_key(output)
    if dataclasses.is_dataclass(output):
        return dataclasses.replace(output, **{key: value})
    replaced = {**output, key: value}
    return replaced if type(output) is dict else type(output)(replaced)


def model_logits(outputs: Any) -> Any:
    """The logits in a model's outputs: ``outputs.logits`` where the output has that attribute (Hugging
    Face ``FlaxSequenceClassifierOutput``), else ``outputs[0]`` of a tuple or list, else ``outputs``."""
    logits = getattr(outputs, "logits", None)
    if logits is not None:
        return logits
    if isinstance(outputs, tuple | list) and outputs:
        return outputs[0]
    return outputs
