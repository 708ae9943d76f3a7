"""Moving the weights between the frameworks for the verifier, with ``torch_ref.convert``.

The PyTorch model is the source of truth; its weights are exported spelled as
the Flax twin's own tree (``target=``, e.g. ``layer_0`` for ``layer.0``), in
eval mode and without autograd (the converter runs ``example_input`` through
the model). The round trip Flax -> PyTorch -> Flax must be bit-exact; the
converter's warnings (an ``Embedding`` with ``padding_idx``) become notes.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator, Mapping

import jax
import numpy as np
import torch
from flax import traverse_util
from torch import nn

from parity_tests.harness import compare
from parity_tests.verifier.rows import EXACT, Row, first_line
from torch_ref.convert import export_flax_params, export_flax_variables, load_flax_variables


def export_variables(model: nn.Module, x_t, name_map, target) -> dict:
    """The PyTorch weights as Flax variables spelled as the twin's ``target``; one line if they do not fit."""
    try:
        with conversion_mode(model):
            return export_flax_variables(model, example_input=x_t, name_map=name_map, target=target)
    except ValueError as e:
        raise ValueError(f"the PyTorch weights converted to Flax do not fit the Flax module: "
                         f"{first_line(e)}; give the layers the same names in both models or pass "
                         "name_map") from e


@contextlib.contextmanager
def converter_notes() -> Iterator[list[str]]:
    """The converter's warnings in the block (``torch_ref``'s, e.g. ``padding_idx``), once each, as notes.

    Other warnings are issued again as they came.
    """
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield notes
    for w in caught:
        if w.category.__module__.startswith("torch_ref"):
            notes.append(first_line(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes[:] = dict.fromkeys(notes)


def flat(tree: Mapping) -> dict[str, np.ndarray]:
    """``{"block1": {"conv": {"kernel": a}}}`` -> ``{"block1/conv/kernel": a}`` (NumPy)."""
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def numpy_tree(tree: Mapping, dtype: str) -> dict:
    """Nested dict of NumPy arrays, floating leaves cast to ``dtype`` (the converter's input)."""
    def leaf(a):
        a = np.asarray(a)
        return a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a

    return jax.tree.map(leaf, dict(tree))


@contextlib.contextmanager
def conversion_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd while the converter runs ``example_input`` through the model.

    The converter's forward pass must not update BatchNorm running statistics
    (train mode would) nor touch the parameters' ``.grad``.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def export_params(model: nn.Module, x_t, name_map, target, *, grads: bool = False) -> dict:
    with conversion_mode(model):
        return export_flax_params(model, grads=grads, example_input=x_t, name_map=name_map,
                                  target=target["params"])


def round_trip_row(model: nn.Module, source: Mapping, x_t, name_map, target) -> Row:
    """Flax -> PyTorch -> Flax on a copy of ``model``: every tensor must come back bit for bit."""
    twin = copy.deepcopy(model)
    with conversion_mode(twin):
        load_flax_variables(twin, source, example_input=x_t, name_map=name_map)
        back = export_flax_variables(twin, example_input=x_t, name_map=name_map, target=target)
    quantity = "round trip Flax->PyTorch->Flax"
    sent, got = flat(source), flat(back)
    if set(sent) != set(got):
        missing, extra = sorted(set(sent) - set(got)), sorted(set(got) - set(sent))
        return Row(quantity, math.inf, EXACT, False, f"keys lost {missing}, gained {extra}")
    row = Row.worst(quantity, [compare(k, "exact", got[k], sent[k], EXACT) for k in sorted(sent)])
    return row if not row.passed else Row(quantity, row.max_rel, EXACT, True, f"{len(sent)} tensors")
