"""Verify any PyTorch model against its Flax twin: weights, penalty, every gradient, an SGD run.

Cross-framework code (it imports JAX and PyTorch), hence in ``parity_tests/``.
The PyTorch module's weights are the source of truth: they are exported to
Flax with ``torch_ref.convert`` (``example_input=x``, so that the flatten
order in front of each ``Linear`` is found), then both frameworks compute
``total = loss + w * sum_l ||d loss / d a_l||^2`` on the same batch and every
quantity is compared normwise with ``parity_tests.harness.compare`` (the
error measure and the tolerances of the whole parity suite)::

    rows = verify_pair(torch_model, flax_model, x_nchw, y,
                       capture_modules={"tanh1": "act1", "tanh2": "act2"})
    print(format_table(rows))
    print(verdict(rows))

Command line (classes built without arguments unless ``--torch-kwargs`` /
``--flax-kwargs`` give some; random ``x ~ U[0, 1)`` and labels from ``--seed``)::

    python -m parity_tests.verify examples.lenet_torch:LeNet examples.lenet_flax:LeNet \\
        --input-shape 8,1,28,28 --num-classes 10 --captures tanh1=act1,tanh2=act2

Exit status 0 when every row passes, 1 when one does not, 2 for a usage error
(one line; ``--debug`` adds the traceback).

Rows, in order: the weight round trip Flax -> PyTorch -> Flax (bit-exact),
the logits, the loss, the penalty, the total, ``d loss / d a`` at each
capture point, the training gradient of every parameter tensor, and two rows
for a ``steps``-step SGD run (``torch.optim.SGD`` against ``optax.sgd``, same
learning rate, same batch every step): the parameters after every step, and
their displacement from the start (the sharp check), each reported as its
worst tensor over all steps. Tolerances: ``harness.TOLERANCES``; the gradient
and displacement rows add an ``atol`` (``gradient_tolerance``,
``displacement_tolerance`` say why).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as linen
import jax
import numpy as np
import optax
import torch
from flax import traverse_util
from torch import nn

from agp_common.config import OneLineErrorParser
from agp_common.errors import UsageError, report_error
from jax_impl import penalized_loss as flax_penalized_loss
from parity_tests.harness import (
    DTYPES,
    TOLERANCES,
    TORCH_DTYPES,
    Comparison,
    Tolerance,
    compare,
    fast_compile_options,
    full_float32,
    jax_dtype,
    nchw_to_nhwc,
    single_threaded_torch,
    to_numpy,
)
from torch_ref import penalized_loss as torch_penalized_loss
from torch_ref.convert import export_flax_params, export_flax_variables, load_flax_variables

#: ``"channels_last"``: rank-4 tensors are NCHW in PyTorch and NHWC in Flax (inputs are transposed
#: before the Flax call, rank-4 activations and logits before the comparison); ``"same"``: both
#: frameworks use the PyTorch module's layout and nothing is transposed.
FLAX_LAYOUTS = ("channels_last", "same")

#: Conversions only move entries (transposes, the flatten permutation), so the round trip gives
#: back the very same bits.
EXACT = Tolerance(0.0, 0.0, "conversions are pure permutations of entries: bit-exact")

DEFAULT_PENALTY_WEIGHT = 10.0
DEFAULT_STEPS = 5
DEFAULT_LR = 0.01

_STATE_COLLECTIONS = ("batch_stats",)


def displacement_tolerance(dtype: str, step: int, theta_scale: float) -> Tolerance:
    """Tolerance on the displacement ``theta_t - theta_0`` of one parameter tensor after ``step`` steps.

    The parameters themselves (dominated by their initial values, so a weak
    check) are compared with ``TOLERANCES``; the displacement, exactly what
    the gradients produced, is the sharp check. Its error has two sources:
    the gradients' (``rtol`` of ``TOLERANCES``) and the rounding of the stored
    parameters, up to one ulp of ``|theta|`` per step between the frameworks
    (``atol = step * eps * max|theta|``). The second is what matters in
    float32: one step moves the parameters by ``lr |g|``, often only ~1e-3 of
    ``|theta|``, so an ulp of ``theta`` (1.2e-7 ``|theta|``) is ~1e-4 of the
    displacement (measured 7.9e-5 on the example LeNet, lr 0.01).
    """
    base = TOLERANCES[dtype]
    atol = step * float(np.finfo(dtype).eps) * theta_scale
    return Tolerance(base.rtol, atol, f"{base.reason}; plus {step} ulp of max|theta| = {atol:.1e}")


def gradient_tolerance(dtype: str, gradient_scale: float) -> Tolerance:
    """Tolerance on each parameter tensor's gradient: ``TOLERANCES`` plus ``atol = rtol * max|grad|``.

    ``gradient_scale`` is the largest entry of the whole gradient (every
    tensor). Each tensor is measured against its own largest entry, and also
    against the whole gradient's: a tensor whose gradient is zero up to
    rounding holds noise that agrees with nothing (a conv bias in front of a
    train-mode BatchNorm, which subtracts the batch mean: its gradient is
    ~1e-17, measured relative error 0.97 between the frameworks). This is the
    normwise measure of ``parity_tests/harness.py`` applied to the gradient as
    one vector.
    """
    base = TOLERANCES[dtype]
    atol = base.rtol * gradient_scale
    return Tolerance(base.rtol, atol, f"{base.reason}; atol = rtol x the largest gradient entry, {atol:.1e}")


@dataclass(frozen=True)
class Row:
    """One verified quantity: the worst normwise relative error, the tolerance, the verdict.

    ``where`` names the worst tensor of an aggregated row (the SGD steps) or
    why a comparison could not be made (a shape or key mismatch).
    """

    quantity: str
    max_rel: float
    tolerance: Tolerance
    passed: bool
    where: str = ""

    @classmethod
    def of(cls, comparison: Comparison) -> Row:
        return cls(comparison.quantity, comparison.max_rel, comparison.tolerance, comparison.passed)

    @classmethod
    def worst(cls, quantity: str, comparisons: Sequence[Comparison]) -> Row:
        """The failing (else any) comparison with the largest relative error; passes if every one does."""
        worst = max(comparisons, key=lambda c: (not c.passed, c.max_rel))
        where = " ".join(filter(None, ("worst:", worst.case, worst.quantity)))
        return cls(quantity, worst.max_rel, worst.tolerance, all(c.passed for c in comparisons), where)


def verify_pair(
    torch_module: nn.Module,
    flax_module: linen.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    capture_modules: Mapping[str, str],
    penalty_weight: float = DEFAULT_PENALTY_WEIGHT,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    dtype: str = "float64",
    train: bool = False,
    flax_apply_kwargs: Mapping[str, Any] | None = None,
    flax_layout: str = "channels_last",
    flax_variables: Mapping | None = None,
    name_map: Mapping[str, str] | None = None,
) -> list[Row]:
    """Compare ``torch_module`` and ``flax_module`` on the batch ``(x, y)``; one :class:`Row` per quantity.

    Both models compute ``total = L + w * sum_l ||g_l||^2``, ``g_l = dL / da_l``
    (``L`` the batch-mean cross-entropy, ``a_l`` the capture points), from the
    same weights, and the rows compare (JAX against PyTorch, normwise, see
    ``parity_tests/harness.py``): the logits, ``L``, the penalty, the total,
    each ``g_l``, ``d total / d theta`` for every parameter tensor, and the
    parameters and their displacement ``theta_t - theta_0`` after each of
    ``steps`` SGD steps with learning rate ``lr`` (``torch.optim.SGD`` against
    ``optax.sgd``, the same batch every step; the worst tensor over all
    steps). The first row is the weight round trip
    Flax -> PyTorch -> Flax (``load_flax_variables`` then
    ``export_flax_variables``), which must be bit-exact.

    Args:
      torch_module: the PyTorch model, the source of truth for the weights. It
        is deep-copied and cast to ``dtype``; the caller's module is not changed.
      flax_module: the Flax Linen twin; its capture points are marked with
        ``jax_impl.capture(self, name, x)`` and its parameter tree must have
        the names ``torch_ref.export_flax_variables`` gives (``block1.conv``
        -> ``{"block1": {"conv": ...}}``), or pass ``name_map``.
      x: the input batch in the PyTorch module's layout (NCHW images), a NumPy
        array or a tensor; floating inputs are cast to ``dtype``.
      y: integer labels (B,).
      capture_modules: ``{Flax capture name: PyTorch capture spec}``. The keys
        are the names given to ``capture`` (nested modules: ``"block/relu"``);
        the values are passed to ``torch_ref.penalized_loss(capture_modules=)``:
        a submodule path whose output is the activation, ``"path:k"`` for its
        k-th call, or the name of an attribute that ``forward`` stores
        (``"relu1"`` for ``self.relu1 = ...``). Every key is penalised on both sides.
      penalty_weight: ``w``.
      steps: SGD steps of the two SGD rows (0 leaves them out).
      lr: learning rate of both optimizers.
      dtype: ``"float64"`` (default; JAX's 64-bit mode is switched on inside
        the call only) or ``"float32"``. Tolerances: ``harness.TOLERANCES``.
      train: BatchNorm in train mode: ``module.train()`` in PyTorch;
        ``mutable=["batch_stats"]`` in Flax, whose module must be told by
        ``flax_apply_kwargs`` (e.g. ``{"train": True}``). ``False`` (default):
        ``module.eval()`` and Flax's ``batch_stats`` (the PyTorch running
        statistics) passed as model state; ``flax_apply_kwargs`` must then
        make the Flax module use ``use_running_average=True``.
      flax_apply_kwargs: extra keyword arguments of ``flax_module.apply``.
      flax_layout: ``"channels_last"`` (default): a rank-4 ``x`` is transposed
        NCHW -> NHWC for Flax and rank-4 PyTorch activations (and logits) are
        transposed the same way before they are compared; ``"same"``: no
        transposes (models whose Flax twin uses the PyTorch layout, or no images).
      flax_variables: Flax variables (``{"params": ..., "batch_stats": ...}``)
        to start from instead of the PyTorch weights: they are loaded into the
        (copied) PyTorch module first, the other conversion direction.
      name_map: passed to the converter (PyTorch module paths to Flax paths).

    Returns:
      The rows; ``all(r.passed for r in rows)`` is the verdict.

    Raises:
      ValueError: arguments out of range, or a pair that cannot be compared:
        the converted parameter tree does not fit the Flax module (missing,
        unexpected or misshapen tensors), a capture name the Flax module does
        not have, a capture spec the PyTorch module does not have.

    Where PyTorch and Flax differ and this function compensates or does not:
      NCHW vs NHWC and the flatten order: compensated (``flax_layout``, the
      converter). BatchNorm's running statistics after train-mode steps are
      *not* compared: PyTorch's ``running_var`` averages the unbiased batch
      variance (n / (n - 1) times the one it normalises with), Flax's the
      biased one, and the two ``momentum`` conventions are complements
      (PyTorch m = 0.1 is Flax 0.9). Train-mode outputs do not read them, so
      every row is comparable. Dropout and other randomness: run such models
      deterministically (eval mode); ``rngs`` are not passed.
    """
    _check_arguments(capture_modules, steps, lr, dtype, flax_layout)
    apply_kwargs = _hashable_kwargs(flax_apply_kwargs)
    names = tuple(capture_modules)
    x_np = _numpy(x)
    if np.issubdtype(x_np.dtype, np.floating):
        x_np = x_np.astype(dtype)
    y_np = _numpy(y).astype(np.int64)
    model = copy.deepcopy(torch_module).to(TORCH_DTYPES[dtype])
    x_t, y_t = torch.from_numpy(np.ascontiguousarray(x_np)), torch.from_numpy(y_np)

    with jax_dtype(dtype), full_float32():  # no TF32 on GPUs
        x_flax = _to_flax_layout(x_np, flax_layout)
        if flax_variables is not None:  # Flax -> PyTorch first: the other conversion direction
            flax_variables = _numpy_tree(flax_variables, dtype)
            with _conversion_mode(model):
                load_flax_variables(model, flax_variables, example_input=x_t, name_map=name_map)
        with _conversion_mode(model):
            variables = export_flax_variables(model, example_input=x_t, name_map=name_map)
        sent = variables if flax_variables is None else flax_variables
        rows = [_round_trip_row(model, sent, x_t, name_map)]
        _check_fits_flax_module(flax_module, variables, x_flax, dict(apply_kwargs), names)

        # One transfer of NumPy arrays, not jnp.asarray: that compiles a program per new shape
        # (one per parameter tensor). Same dtype canonicalisation (int64 labels -> int32 without x64).
        model_state = {c: variables[c] for c in _STATE_COLLECTIONS if c in variables}
        params, model_state, x_j, y_j, weight_j, lr_j = jax.device_put((
            variables["params"], model_state, x_flax, y_np,
            np.asarray(penalty_weight, x_flax.dtype), np.asarray(lr, x_flax.dtype)))
        mutable = tuple(model_state) if train else ()
        opt_state = optax.sgd(lr).init(params)

        def flax_step(params, opt_state, model_state):
            return _compiled_sgd_step()(params, opt_state, model_state or None, x_j, y_j, weight_j, lr_j,
                                        model=flax_module, layers=names, mutable=mutable,
                                        apply_kwargs=apply_kwargs)

        def torch_step():
            return _torch_total_and_backward(model, x_t, y_t, penalty_weight, capture_modules)

        model.train(train)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        total_t, aux_t = torch_step()
        grads_t = _flat(_export_params(model, x_t, name_map, grads=True))
        params, opt_state, model_state, total_j, aux_j, grads_j = flax_step(params, opt_state, model_state)
        total_j, aux_j, grads_j = jax.device_get((total_j, aux_j, grads_j))  # NumPy from here on
        rows += _single_step_rows(dtype, names, flax_layout, (total_j, aux_j, _flat(grads_j)),
                                  (total_t, aux_t, grads_t))

        # SGD from the same weights on the same batch; step 1 uses the gradients above.
        initial = _flat(variables["params"])
        moved: list[Comparison] = []
        displaced: list[Comparison] = []
        for step in range(1, steps + 1):
            if step > 1:
                torch_step()
                params, opt_state, model_state, *_ = flax_step(params, opt_state, model_state)
            optimizer.step()
            flat_params, case = _flat(jax.device_get(params)), f"step {step}"
            for key, expected in _flat(_export_params(model, x_t, name_map)).items():
                actual = flat_params[key]
                moved.append(compare(f"params[{key}]", dtype, actual, expected, TOLERANCES[dtype], case))
                theta_scale = float(np.max(np.abs(expected), initial=0.0))
                displaced.append(compare(f"params[{key}]", dtype, actual - initial[key],
                                         expected - initial[key],
                                         displacement_tolerance(dtype, step, theta_scale), case))
        if steps:
            rows.append(Row.worst(f"sgd params, {steps} steps", moved))
            rows.append(Row.worst(f"sgd displacement, {steps} steps", displaced))
    return rows


def _single_step_rows(dtype, names, flax_layout, flax_results, torch_results) -> list[Row]:
    """Logits, loss, penalty, total, each ``dL/da``, each parameter's gradient: Flax against PyTorch.

    ``*_results`` are ``(total, aux, flat gradients)``; PyTorch's rank-4
    tensors are moved to the Flax layout first.
    """
    total_j, aux_j, grads_j = flax_results
    total_t, aux_t, grads_t = torch_results

    def torch_in_flax_layout(t: torch.Tensor) -> np.ndarray:
        return _to_flax_layout(to_numpy(t), flax_layout)

    rows = [
        _compare("logits", dtype, aux_j["logits"], torch_in_flax_layout(aux_t["logits"])),
        _compare("loss", dtype, aux_j["loss"], to_numpy(aux_t["loss"])),
        _compare("penalty", dtype, aux_j["penalty"], to_numpy(aux_t["penalty"])),
        _compare("total", dtype, total_j, to_numpy(total_t)),
    ]
    rows += [_compare(f"dL/da[{n}]", dtype, aux_j["activation_grads"][n],
                      torch_in_flax_layout(aux_t["activation_grads"][n])) for n in names]
    tolerance = gradient_tolerance(dtype, max(np.max(np.abs(g), initial=0.0) for g in grads_t.values()))
    rows += [_compare(f"grad[{k}]", dtype, grads_j[k], g, tolerance) for k, g in grads_t.items()]
    return rows


def init_flax_variables(
    flax_module: linen.Module,
    x: np.ndarray | torch.Tensor,
    *,
    seed: int = 0,
    dtype: str = "float64",
    flax_layout: str = "channels_last",
    flax_apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``flax_module.init`` on ``x`` (PyTorch layout, as for ``verify_pair``): ``{"params", "batch_stats"}``.

    The weights for the Flax -> PyTorch direction (``verify_pair(...,
    flax_variables=)``), as NumPy arrays in ``dtype``; the collections that
    hold no weights (``perturbations``, ``intermediates``) are left out.
    """
    apply_kwargs = dict(flax_apply_kwargs or {})

    def init(x_flax):
        # The key is drawn inside the program: eagerly it costs two programs of its own; the bits
        # are those of an eager jax.random.key(seed) (same call on the same Python seed).
        return flax_module.init(jax.random.key(seed), x_flax, **apply_kwargs)

    with jax_dtype(dtype):
        # NumPy straight into the program: jnp.asarray would compile one more (per shape).
        x_flax = _to_flax_layout(_numpy(x), flax_layout)
        variables = jax.jit(init, compiler_options=_compiler_options())(x_flax)
        kept = [c for c in ("params", *_STATE_COLLECTIONS) if c in variables]
        return {c: _numpy_tree(variables[c], dtype) for c in kept}


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table: quantity, max rel err, tolerance, pass/FAIL, where."""
    header = ("quantity", "max rel err", "tolerance", "result", "")
    lines = [(r.quantity, _format_error(r.max_rel), _format_tolerance(r.tolerance),
              "pass" if r.passed else "FAIL", r.where) for r in rows]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in [header, *lines])


def verdict(rows: Sequence[Row]) -> str:
    """One line: every row passes, or which ones do not."""
    failed = [r.quantity for r in rows if not r.passed]
    if not failed:
        return f"PASS: all {len(rows)} rows within tolerance"
    return f"FAIL: {len(failed)} of {len(rows)} rows out of tolerance: {', '.join(failed)}"


# ---------------------------------------------------------------------------------- internals


def _check_arguments(capture_modules, steps, lr, dtype, flax_layout) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if flax_layout not in FLAX_LAYOUTS:
        raise ValueError(f"flax_layout must be one of {FLAX_LAYOUTS}, got {flax_layout!r}")
    if not isinstance(capture_modules, Mapping) or not capture_modules:
        raise ValueError("capture_modules must be a non-empty {Flax capture name: PyTorch module spec} "
                         f"mapping, got {capture_modules!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")


def _numpy(a) -> np.ndarray:
    return to_numpy(a) if isinstance(a, torch.Tensor) else np.asarray(a)


def _numpy_tree(tree: Mapping, dtype: str) -> dict:
    """Nested dict of NumPy arrays, floating leaves cast to ``dtype`` (the converter's input)."""
    def leaf(a):
        a = np.asarray(a)
        return a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a

    return jax.tree.map(leaf, dict(tree))


def _to_flax_layout(a: np.ndarray, flax_layout: str) -> np.ndarray:
    """A PyTorch tensor in the Flax twin's layout: rank 4 NCHW -> NHWC under ``"channels_last"``."""
    a = np.asarray(a)
    return nchw_to_nhwc(a) if flax_layout == "channels_last" and a.ndim == 4 else a


def _flat(tree: Mapping) -> dict[str, np.ndarray]:
    """``{"block1": {"conv": {"kernel": a}}}`` -> ``{"block1/conv/kernel": a}`` (NumPy)."""
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


@contextlib.contextmanager
def _conversion_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd while the converter runs ``example_input`` through the model.

    The converter's forward pass must not update BatchNorm running statistics
    (train mode would) nor touch the parameters' ``.grad``.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _export_params(model: nn.Module, x_t: torch.Tensor, name_map, *, grads: bool = False) -> dict:
    with _conversion_mode(model):
        return export_flax_params(model, grads=grads, example_input=x_t, name_map=name_map)


def _round_trip_row(model: nn.Module, source: Mapping, x_t: torch.Tensor, name_map) -> Row:
    """Flax -> PyTorch -> Flax on a copy of ``model``: every tensor must come back bit for bit."""
    twin = copy.deepcopy(model)
    with _conversion_mode(twin):
        load_flax_variables(twin, source, example_input=x_t, name_map=name_map)
        back = export_flax_variables(twin, example_input=x_t, name_map=name_map)
    quantity = "round trip Flax->PyTorch->Flax"
    sent, got = _flat(source), _flat(back)
    if set(sent) != set(got):
        missing, extra = sorted(set(sent) - set(got)), sorted(set(got) - set(sent))
        return Row(quantity, math.inf, EXACT, False, f"keys lost {missing}, gained {extra}")
    row = Row.worst(quantity, [compare(k, "exact", got[k], sent[k], EXACT) for k in sorted(sent)])
    return row if not row.passed else Row(quantity, row.max_rel, EXACT, True, f"{len(sent)} tensors")


def _check_fits_flax_module(flax_module, variables, x_j, apply_kwargs, names) -> None:
    """One-line ``ValueError`` if the converted weights or the capture names do not fit the Flax module."""
    try:
        shapes = jax.eval_shape(lambda x: flax_module.init(jax.random.key(0), x, **apply_kwargs), x_j)
    except Exception as e:  # the user's module: any exception means it cannot run on x
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"the Flax module cannot be initialised on an input of shape {tuple(x_j.shape)} "
                         f"with apply kwargs {apply_kwargs}: {type(e).__name__}: {first}") from e
    for collection in ("params", *_STATE_COLLECTIONS):
        expected = {k: tuple(v.shape) for k, v in _flat_shapes(shapes.get(collection, {})).items()}
        given = {k: tuple(np.shape(v)) for k, v in _flat(variables.get(collection, {})).items()}
        missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        wrong = [f"{k} {given[k]} != {expected[k]}" for k in sorted(set(expected) & set(given))
                 if given[k] != expected[k]]
        if missing or extra or wrong:
            raise ValueError(
                f"the PyTorch weights converted to Flax do not fit the Flax module's {collection!r}: "
                f"missing {missing}, unexpected {extra}, shape (converted != Flax) {wrong}; "
                "give the layers the same names in both models or pass name_map")
    available = tuple(traverse_util.flatten_dict(dict(shapes.get("perturbations", {})), sep="/"))
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"capture name(s) {unknown} are not capture points of the Flax module, which has "
                         f"{list(available)} (mark them with jax_impl.capture(self, name, x))")


def _flat_shapes(tree) -> dict:
    return traverse_util.flatten_dict(dict(tree), sep="/")


def _torch_total_and_backward(model, x_t, y_t, penalty_weight, capture_modules):
    model.zero_grad(set_to_none=True)
    total, aux = torch_penalized_loss(model, x_t, y_t, penalty_weight, list(capture_modules),
                                      capture_modules=dict(capture_modules))
    total.backward()
    return total, aux


@functools.cache
def _compiled_sgd_step():
    """``_sgd_step`` compiled once per model, capture names and options (static), dtype and shapes."""
    return jax.jit(_sgd_step, static_argnames=("model", "layers", "mutable", "apply_kwargs"),
                   compiler_options=_compiler_options())


def _compiler_options() -> dict[str, Any] | None:
    """Compile for speed of compilation (``harness.FAST_COMPILE_CPU`` on CPU).

    The verifier compiles each pair once and runs it a few times, so XLA's
    CPU optimisation passes cost seconds and save microseconds (loaded 2-core
    machine, test LeNet: the penalised SGD step 6.9 s -> 3.2 s, ``init``
    8.2 s -> 1.7 s). They do not change the arithmetic (no fast-math either
    way; the total moved by 1 ulp).
    """
    return fast_compile_options()


def _sgd_step(params, opt_state, model_state, x, y, penalty_weight, lr, *,
              model, layers, mutable, apply_kwargs):
    """One ``optax.sgd`` step on the penalised total; also returns the total, aux and the gradients.

    The total, aux and gradients are those at the incoming ``params``, so the
    first call serves the single-step rows as well.
    """

    def total(p):
        return flax_penalized_loss(p, model, x, y, penalty_weight=penalty_weight, layers=layers,
                                   model_state=model_state, mutable=mutable, apply_kwargs=dict(apply_kwargs))

    (value, aux), grads = jax.value_and_grad(total, has_aux=True)(params)
    updates, opt_state = optax.sgd(lr).update(grads, opt_state, params)
    if mutable:
        model_state = {**model_state, **aux["model_state"]}
    return optax.apply_updates(params, updates), opt_state, model_state, value, aux, grads


def _hashable_kwargs(kwargs: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """``flax_apply_kwargs`` as sorted items: a static argument of the compiled step."""
    items = tuple(sorted(dict(kwargs or {}).items()))
    try:
        hash(items)
    except TypeError as e:
        raise ValueError(
            f"flax_apply_kwargs values must be hashable (True, 0.5, 'name'); got {kwargs!r}") from e
    return items


def _compare(quantity, dtype, actual, expected, tolerance=None, case="") -> Row:
    """One row; a shape mismatch (a layout mistake) is a failing row, not an exception."""
    tolerance = tolerance or TOLERANCES[dtype]
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return Row(quantity, math.inf, tolerance, False,
                   f"shape {actual.shape} (Flax) != {expected.shape} (PyTorch)")
    return Row.of(compare(quantity, dtype, actual, expected, tolerance, case))


def _format_error(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}"


def _format_tolerance(tolerance: Tolerance) -> str:
    return "exact" if tolerance.rtol == 0 and tolerance.atol == 0 else str(tolerance)


# ---------------------------------------------------------------------------------------- CLI


def _import_class(spec: str, what: str) -> type:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} class: expected 'package.module:ClassName', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{what} class {spec!r}: cannot import module {module_name!r} ({e}); "
                         "run from the directory that contains the package") from e
    cls = module
    for part in attr.split("."):
        if not hasattr(cls, part):
            raise UsageError(f"{what} class {spec!r}: module {module_name!r} has no attribute {attr!r}")
        cls = getattr(cls, part)
    return cls


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise UsageError(f"--input-shape: expected positive integers 'B,C,H,W' (or 'B,D'), got {text!r}")
    return shape


def _parse_captures(text: str) -> dict[str, str]:
    captures = {}
    for item in text.split(","):
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise UsageError(f"--captures: expected 'flax_name=torch.module.path[:k],...', got {text!r}")
        captures[name.strip()] = spec.strip()
    return captures


def _parse_json_object(text: str | None, flag: str) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag}: expected a JSON object like '{{\"features\": 8}}', got {text!r} "
                         f"({e})") from e
    if not isinstance(value, dict):
        raise UsageError(f"{flag}: expected a JSON object like '{{\"features\": 8}}', got {text!r}")
    return value


def _construct(cls, kwargs: dict, base: type, what: str, flag: str):
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise UsageError(f"{what} class: expected a subclass of {base.__module__}.{base.__qualname__}, "
                         f"got {cls!r}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UsageError(f"{what} class {cls.__qualname__}{kwargs or '()'}: {e}; pass constructor "
                         f"arguments with {flag}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m parity_tests.verify",
        description="Verify a PyTorch model against its Flax twin: weights, activation gradient "
                    "penalty, every gradient, an SGD run.")
    parser.add_argument("torch_class", help="PyTorch nn.Module class, 'package.module:ClassName'")
    parser.add_argument("flax_class", help="Flax linen.Module class, 'package.module:ClassName'")
    parser.add_argument("--input-shape", required=True,
                        help="input shape in the PyTorch layout, e.g. 8,3,32,32 (x ~ U[0, 1))")
    parser.add_argument("--num-classes", type=int, default=10, help="labels uniform in [0, N) (default 10)")
    parser.add_argument("--captures", required=True,
                        help="flax_name=torch_spec,...: Flax capture names and the PyTorch submodule "
                             "paths ('path' or 'path:k') whose outputs they are")
    parser.add_argument("--torch-kwargs", help="JSON object of PyTorch constructor arguments")
    parser.add_argument("--flax-kwargs", help="JSON object of Flax constructor arguments")
    parser.add_argument("--flax-apply-kwargs",
                        help='JSON object of flax apply keyword arguments, e.g. \'{"train": true}\'')
    parser.add_argument("--name-map", help="JSON object: PyTorch module path -> Flax path, for the converter")
    parser.add_argument("--penalty-weight", type=float, default=DEFAULT_PENALTY_WEIGHT,
                        help=f"w (default {DEFAULT_PENALTY_WEIGHT:g})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"SGD steps compared (default {DEFAULT_STEPS})")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help=f"SGD learning rate (default {DEFAULT_LR})")
    parser.add_argument("--dtype", choices=DTYPES, default="float64")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, x and the labels")
    parser.add_argument("--train", action="store_true",
                        help="BatchNorm in train mode (PyTorch .train(), Flax mutable batch_stats; "
                             "give the Flax flag with --flax-apply-kwargs)")
    parser.add_argument("--init", choices=("torch", "flax"), default="torch",
                        help="which framework initialises the weights (default torch)")
    parser.add_argument("--flax-layout", choices=FLAX_LAYOUTS, default="channels_last",
                        help="channels_last: rank-4 tensors are NCHW in PyTorch, NHWC in Flax (default)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the table and a verdict line; exit 0 if every row passes, 1 if not, 2 on usage errors."""
    args = build_parser().parse_args(argv)
    try:
        rows = _run(args)
    except (UsageError, ValueError) as e:
        return report_error(UsageError(str(e)) if isinstance(e, ValueError) else e, args.debug)
    print(format_table(rows))
    print(verdict(rows), flush=True)
    return 0 if all(r.passed for r in rows) else 1


def _run(args: argparse.Namespace) -> list[Row]:
    shape = _parse_shape(args.input_shape)
    captures = _parse_captures(args.captures)
    if args.num_classes < 1:
        raise UsageError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.steps < 0:
        raise UsageError(f"--steps must be >= 0, got {args.steps}")
    torch_kwargs = _parse_json_object(args.torch_kwargs, "--torch-kwargs")
    flax_kwargs = _parse_json_object(args.flax_kwargs, "--flax-kwargs")
    apply_kwargs = _parse_json_object(args.flax_apply_kwargs, "--flax-apply-kwargs")
    name_map = _parse_json_object(args.name_map, "--name-map") or None
    torch_cls = _import_class(args.torch_class, "PyTorch")
    flax_cls = _import_class(args.flax_class, "Flax")
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        torch_module = _construct(torch_cls, torch_kwargs, nn.Module, "PyTorch", "--torch-kwargs")
    flax_module = _construct(flax_cls, flax_kwargs, linen.Module, "Flax", "--flax-kwargs")
    rng = np.random.default_rng(args.seed)
    x = rng.random(shape).astype(args.dtype)
    y = rng.integers(0, args.num_classes, shape[0])
    flax_variables = None
    if args.init == "flax":
        flax_variables = init_flax_variables(flax_module, x, seed=args.seed, dtype=args.dtype,
                                             flax_layout=args.flax_layout, flax_apply_kwargs=apply_kwargs)
    with single_threaded_torch():
        return verify_pair(
            torch_module, flax_module, x, y, capture_modules=captures, penalty_weight=args.penalty_weight,
            steps=args.steps, lr=args.lr, dtype=args.dtype, train=args.train, flax_apply_kwargs=apply_kwargs,
            flax_layout=args.flax_layout, flax_variables=flax_variables, name_map=name_map)


if __name__ == "__main__":
    sys.exit(main())
