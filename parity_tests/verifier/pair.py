"""``verify_pair``: one PyTorch model against its Flax twin, from the same weights, row by row.

The PyTorch module's weights are the source of truth: they are exported to
Flax with ``torch_ref.convert`` (``example_input=x``, so that the flatten
order in front of each ``Linear`` is found; ``target=`` the Flax twin's own
tree, so that its spellings are used), then both frameworks compute
``total = loss + w * sum_l ||d loss / d a_l||^2`` on the same batch and every
quantity is compared normwise with ``parity_tests.harness.compare`` (the
error measure and the tolerances of the whole parity suite).

Rows, in order: the weight round trip Flax -> PyTorch -> Flax (bit-exact),
the logits, the loss, the penalty, the total, ``d loss / d a`` at each
capture point, the training gradient of every parameter tensor, two rows for
a ``steps``-step SGD run (``torch.optim.SGD`` against ``optax.sgd``, same
learning rate, same batch every step: the parameters after every step and
their displacement from the start, each as its worst tensor over all steps),
then notes: the converter's warnings, how dropout was handled, and the
normalisation layers' settings (which fail the pair where the twins differ).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
import torch
from flax import traverse_util
from torch import nn

from parity_tests.harness import (
    DTYPES,
    TORCH_DTYPES,
    Comparison,
    compare,
    fast_compile_options,
    full_float32,
    jax_dtype,
    to_numpy,
)
from parity_tests.verifier.captures import (
    Capture,
    check_flax_captures,
    flax_capture_modules,
    parse_captures,
    torch_capture_modules,
)
from parity_tests.verifier.conversion import (
    conversion_mode,
    converter_notes,
    export_params,
    export_variables,
    flat,
    numpy_tree,
    round_trip_row,
)
from parity_tests.verifier.flax_step import compiled_sgd_step
from parity_tests.verifier.flax_twin import FlaxTwin, abstract_init, flax_twin, hashable_kwargs
from parity_tests.verifier.inputs import (
    FLAX_LAYOUTS,
    activation_to_flax_layout,
    as_numpy_inputs,
    batch_size,
    call_arguments,
    describe,
    map_inputs,
    to_flax_layout,
    to_torch,
)
from parity_tests.verifier.rows import (
    Row,
    compare_row,
    displacement_tolerance,
    first_line,
    gradient_tolerance,
    params_tolerance,
)
from parity_tests.verifier.settings import (
    check_batch_norm_modes,
    check_flax_dropout_off,
    dropout_row,
    normalization_row,
    set_torch_mode,
    torch_layers,
)
from torch_ref import penalized_loss as torch_penalized_loss
from torch_ref.capture import call_model, output_logits
from torch_ref.convert import load_flax_variables

DEFAULT_PENALTY_WEIGHT = 10.0
DEFAULT_STEPS = 5
DEFAULT_LR = 0.01

_STATE_COLLECTIONS = ("batch_stats",)


class LabelsOutOfRange(ValueError):
    """Labels ``y`` outside ``[0, classes)`` for the model's ``classes`` logits (CLI: ``--num-classes``)."""

    def __init__(self, message: str, classes: int):
        super().__init__(message)
        self.classes = classes


def verify_pair(
    torch_module: nn.Module,
    flax_module: Any,
    x: Any,
    y: np.ndarray | torch.Tensor,
    *,
    capture_modules: Mapping[str, str] | Sequence[str],
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
    (``L`` the batch-mean cross-entropy of the logits, ``a_l`` the capture
    points), from the same weights; the rows are listed in the module docstring.

    Args:
      torch_module: the PyTorch model, the source of truth for the weights. It
        is deep-copied and cast to ``dtype``; the caller's module is not changed.
      flax_module: the Flax twin: a Linen module whose parameter tree has the
        names ``torch_ref.export_flax_variables`` gives (``block1.conv`` ->
        ``{"block1": {"conv": ...}}``; else pass ``name_map``), or a Hugging
        Face ``FlaxPreTrainedModel``, whose Linen ``.module`` is run with the
        arguments its ``__call__`` would pass (``parity_tests.verifier.flax_twin``).
        Hugging Face Flax models compute in their ``dtype`` field: build them
        with ``dtype=jnp.float64`` for a float64 run.
      x: the inputs in the PyTorch module's layout (NCHW images): one array, a
        tuple (positional inputs) or a dict (keyword inputs, e.g.
        ``input_ids``, ``attention_mask``), NumPy arrays or tensors. Floating
        inputs are cast to ``dtype``; integer inputs (token ids, masks) keep theirs.
      y: integer labels (B,), B the first input's leading axis.
      capture_modules: the activations penalised, ``{name: spec}`` or a sequence
        of PyTorch module paths (each its own name). A spec is the PyTorch
        submodule path (``"layer1.0"``, ``"path:k"`` for its k-th call, or an
        attribute ``forward`` stores), optionally followed by ``"@flax/path"``.
        Flax side: the twin's ``capture(self, name, ...)`` point ``name`` if it
        has one, else the module at the ``@`` path, else at the PyTorch path
        with ``"."`` -> ``"/"`` (``parity_tests.verifier.captures``).
      penalty_weight: ``w``.
      steps: SGD steps of the two SGD rows (0 leaves them out).
      lr: learning rate of both optimizers.
      dtype: ``"float64"`` (default; JAX's 64-bit mode is switched on inside
        the call only) or ``"float32"``: the dtype of the weights, the floating
        inputs, ``lr`` and ``w``. Tolerances: ``harness.TOLERANCES``.
      train: BatchNorm in train mode: PyTorch's BatchNorm modules in train mode
        (everything else in eval mode: dropout stays off); Flax with
        ``mutable=["batch_stats"]``, whose module must be told by
        ``flax_apply_kwargs`` (e.g. ``{"train": True}``; a Hugging Face wrapper
        is told ``train=True``). ``False`` (default): eval mode, Flax's
        ``batch_stats`` (the PyTorch running statistics) passed as model state.
      flax_apply_kwargs: extra keyword arguments of the Flax module's ``apply``.
      flax_layout: ``"channels_last"`` (default): rank-4 floating inputs are
        transposed NCHW -> NHWC for Flax and rank-4 PyTorch activations (and
        logits) the same way before they are compared; ``"same"``: no transposes.
      flax_variables: Flax variables (``{"params": ..., "batch_stats": ...}``)
        to start from instead of the PyTorch weights: they are loaded into the
        (copied) PyTorch module first, the other conversion direction.
      name_map: passed to the converter (PyTorch module paths to Flax paths).

    Returns:
      The rows; ``all(r.passed for r in rows)`` is the verdict.

    Raises:
      ValueError (one line): arguments out of range, or a pair that cannot be
        compared: a model without parameters, an output without (B, K) logits,
        labels outside ``[0, K)`` (``LabelsOutOfRange``), weights that do not fit
        the Flax module, a capture the Flax module does not have, a Flax model
        computing in a narrower dtype than ``dtype``, a Flax dropout left on.

    Where PyTorch and Flax differ and this function compensates or does not:
      NCHW vs NHWC and the flatten order: compensated (``flax_layout``, the
      converter). BatchNorm's running statistics after train-mode steps are
      *not* compared: PyTorch's ``running_var`` averages the unbiased batch
      variance, Flax's the biased one; the ``momentum`` conventions are
      complements (PyTorch m = 0.1 is Flax 0.9), which the settings row checks.
      Dropout is off on both sides (a row says so): random masks cannot match.
    """
    _check_arguments(steps, lr, dtype, flax_layout, penalty_weight)
    captures = parse_captures(capture_modules)
    x_np = as_numpy_inputs(x, dtype)
    y_np = _labels(y, batch_size(x_np))
    model = copy.deepcopy(torch_module).to(TORCH_DTYPES[dtype])
    if not any(True for _ in model.parameters()):
        raise ValueError(f"the PyTorch model {type(model).__name__} has no parameters: there is no gradient "
                         "to verify")
    x_t, y_t = to_torch(x_np), torch.from_numpy(y_np)
    _check_torch_output(model, x_t, y_np)
    torch_found = torch_layers(model, train)
    with converter_notes() as notes, jax_dtype(dtype), full_float32():  # no TF32 on GPUs
        twin = flax_twin(flax_module, x_np, to_flax_layout(x_np, flax_layout), flax_apply_kwargs or {},
                         train=train, dtype=dtype)
        shapes, calls = abstract_init(twin)
        flax_found = calls.layers
        check_flax_dropout_off(flax_found)
        check_batch_norm_modes(torch_found, flax_found, name_map)
        capture_points = tuple(traverse_util.flatten_dict(dict(shapes.get("perturbations", {})), sep="/"))
        check_flax_captures(captures, capture_points, calls.paths)
        target = {c: shapes[c] for c in ("params", *_STATE_COLLECTIONS) if c in shapes}
        if flax_variables is not None:  # Flax -> PyTorch first: the other conversion direction
            flax_variables = numpy_tree(flax_variables, dtype)
            with conversion_mode(model):
                load_flax_variables(model, flax_variables, example_input=x_t, name_map=name_map)
        variables = export_variables(model, x_t, name_map, target)
        sent = variables if flax_variables is None else flax_variables
        rows = [round_trip_row(model, sent, x_t, name_map, target)]
        rows += _run_rows(model, twin, variables, x_t, y_t, y_np, captures, capture_points, penalty_weight,
                          steps, lr, dtype, train, flax_layout, name_map, target)
    rows += [Row.note("converter", message) for message in notes]
    rows.append(dropout_row(torch_found, flax_found))
    settings = normalization_row(torch_found, flax_found, name_map)
    return rows + ([settings] if settings is not None else [])


def _run_rows(model, twin: FlaxTwin, variables, x_t, y_t, y_np, captures: Sequence[Capture], capture_points,
              penalty_weight, steps, lr, dtype, train, flax_layout, name_map, target) -> list[Row]:
    """The single-step rows and the SGD rows: both frameworks step from ``variables`` on the same batch."""
    names = tuple(c.name for c in captures)
    torch_captures = torch_capture_modules(captures)
    flax_captures = tuple(sorted(flax_capture_modules(captures, capture_points).items()))
    # One transfer of NumPy arrays, not jnp.asarray: that compiles a program per new shape (one per
    # parameter tensor). lr and w in the run's float dtype: never the inputs' (token ids are integers).
    model_state = {c: variables[c] for c in _STATE_COLLECTIONS if c in variables}
    params, model_state, x_j, y_j, weight_j, lr_j = jax.device_put((
        variables["params"], model_state, twin.x, y_np, np.asarray(penalty_weight, dtype),
        np.asarray(lr, dtype)))
    mutable = tuple(model_state) if train else ()
    opt_state = optax.sgd(lr).init(params)
    step_fn = compiled_sgd_step(twin.module)
    static = {"layers": names, "capture_modules": flax_captures, "mutable": mutable,
              "apply_kwargs": twin.apply_kwargs}

    def flax_step(params, opt_state, model_state):
        return step_fn(params, opt_state, model_state or None, x_j, y_j, weight_j, lr_j, **static)

    def torch_step():
        model.zero_grad(set_to_none=True)
        total, aux = torch_penalized_loss(model, x_t, y_t, penalty_weight, list(names),
                                          capture_modules=torch_captures)
        try:
            total.backward()
        except RuntimeError as e:  # the user's model: e.g. fused attention, which has no second derivative
            raise ValueError(f"the PyTorch model's penalised backward pass failed: {first_line(e)}") from e
        return total, aux

    set_torch_mode(model, train)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    total_t, aux_t = torch_step()
    grads_t = flat(export_params(model, x_t, name_map, target, grads=True))
    params, opt_state, model_state, total_j, aux_j, grads_j = flax_step(params, opt_state, model_state)
    total_j, aux_j, grads_j = jax.device_get((total_j, aux_j, grads_j))  # NumPy from here on
    rows = _single_step_rows(dtype, names, flax_layout, (total_j, aux_j, flat(grads_j)),
                             (total_t, aux_t, grads_t))
    # How far one step may move a tensor differently: lr x the gradient rows' atol (at step 1's gradient).
    step_atol = lr * gradient_tolerance(dtype, _largest(grads_t)).atol

    # SGD from the same weights on the same batch; step 1 uses the gradients above.
    initial = flat(variables["params"])
    moved: list[Comparison] = []
    displaced: list[Comparison] = []
    for step in range(1, steps + 1):
        if step > 1:
            torch_step()
            params, opt_state, model_state, *_ = flax_step(params, opt_state, model_state)
        optimizer.step()
        flat_params, case = flat(jax.device_get(params)), f"step {step}"
        for key, expected in flat(export_params(model, x_t, name_map, target)).items():
            actual = flat_params[key]
            moved.append(compare(f"params[{key}]", dtype, actual, expected,
                                 params_tolerance(dtype, step, step_atol), case))
            theta_scale = float(np.max(np.abs(expected), initial=0.0))
            displaced.append(compare(f"params[{key}]", dtype, actual - initial[key], expected - initial[key],
                                     displacement_tolerance(dtype, step, theta_scale, step_atol), case))
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
        return activation_to_flax_layout(to_numpy(t), flax_layout)

    rows = [
        compare_row("logits", dtype, aux_j["logits"], torch_in_flax_layout(aux_t["logits"])),
        compare_row("loss", dtype, aux_j["loss"], to_numpy(aux_t["loss"])),
        compare_row("penalty", dtype, aux_j["penalty"], to_numpy(aux_t["penalty"])),
        compare_row("total", dtype, total_j, to_numpy(total_t)),
    ]
    rows += [compare_row(f"dL/da[{n}]", dtype, aux_j["activation_grads"][n],
                         torch_in_flax_layout(aux_t["activation_grads"][n])) for n in names]
    tolerance = gradient_tolerance(dtype, _largest(grads_t))
    rows += [compare_row(f"grad[{k}]", dtype, grads_j[k], g, tolerance) for k, g in grads_t.items()]
    return rows


def init_flax_variables(
    flax_module: Any,
    x: Any,
    *,
    seed: int = 0,
    dtype: str = "float64",
    flax_layout: str = "channels_last",
    flax_apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``flax_module.init`` on ``x`` (PyTorch layout, as for ``verify_pair``): ``{"params", "batch_stats"}``.

    The weights for the Flax -> PyTorch direction (``verify_pair(...,
    flax_variables=)``), as NumPy arrays in ``dtype``; the collections that
    hold no weights (``perturbations``, ``intermediates``) are left out. A
    Hugging Face ``FlaxPreTrainedModel`` is initialised through its ``.module``.
    """
    x_np = as_numpy_inputs(x, dtype)
    with jax_dtype(dtype):
        twin = flax_twin(flax_module, x_np, to_flax_layout(x_np, flax_layout), flax_apply_kwargs or {},
                         train=False, dtype=dtype)

        def init(inputs):
            # The key is drawn inside the program: eagerly it costs two programs of its own; the bits
            # are those of an eager jax.random.key(seed) (same call on the same Python seed).
            args, kwargs = call_arguments(inputs)
            return twin.module.init(jax.random.key(seed), *args, **kwargs, **dict(twin.apply_kwargs))

        # NumPy straight into the program: jnp.asarray would compile one more (per shape).
        variables = jax.jit(init, compiler_options=fast_compile_options())(twin.x)
        kept = [c for c in ("params", *_STATE_COLLECTIONS) if c in variables]
        return {c: numpy_tree(variables[c], dtype) for c in kept}


# ---------------------------------------------------------------------------------- internals


def _check_arguments(steps, lr, dtype, flax_layout, penalty_weight) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if flax_layout not in FLAX_LAYOUTS:
        raise ValueError(f"flax_layout must be one of {FLAX_LAYOUTS}, got {flax_layout!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(penalty_weight, int | float) and math.isfinite(penalty_weight)
            and penalty_weight >= 0):
        raise ValueError(f"penalty_weight must be a finite number >= 0, got {penalty_weight!r}")


def _largest(grads: Mapping[str, np.ndarray]) -> float:
    """The largest gradient entry over all tensors."""
    return max(float(np.max(np.abs(g), initial=0.0)) for g in grads.values())


def _labels(y, batch: int) -> np.ndarray:
    y = to_numpy(y) if isinstance(y, torch.Tensor) else np.asarray(y)
    if y.shape != (batch,) or y.dtype.kind not in "iu":
        raise ValueError(f"y: expected integer labels of shape ({batch},) (the batch of x), got shape "
                         f"{y.shape}, dtype {y.dtype}")
    return y.astype(np.int64)


def _check_torch_output(model: nn.Module, x_t, y: np.ndarray) -> None:
    """One-line ``ValueError`` if the model cannot run on ``x_t`` or gives no (B, K) logits for ``y``."""
    try:
        with conversion_mode(model):
            output = call_model(model, x_t)
    except Exception as e:  # the user's model: any exception means it cannot run on x
        raise ValueError(f"the PyTorch model {type(model).__name__} cannot run on the inputs "
                         f"({describe(map_inputs(to_numpy, x_t))}): {type(e).__name__}: "
                         f"{first_line(e)}") from e
    logits = output_logits(output)
    if logits is None or logits.dim() != 2 or logits.shape[0] != len(y):
        found = type(output).__name__ if logits is None else f"shape {tuple(logits.shape)}"
        raise ValueError(f"the PyTorch model's output must hold logits of shape (B, classes) = ({len(y)}, K) "
                         f"(the output, its .logits, or element 0 of a tuple), got {found}")
    classes = int(logits.shape[1])
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise LabelsOutOfRange(f"labels must lie in [0, {classes}) for the model's {classes} logits, got "
                               f"[{y.min()}, {y.max()}]", classes)




__all__ = ["DEFAULT_LR", "DEFAULT_PENALTY_WEIGHT", "DEFAULT_STEPS", "LabelsOutOfRange", "hashable_kwargs",
           "init_flax_variables", "verify_pair"]
