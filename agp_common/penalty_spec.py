"""The penalty's options: one frozen object, ``PenaltyOptions``, shared by both frameworks and the CLIs.

``jax_impl.penalized_loss``, ``torch_ref.penalized_loss``, ``TrainConfig`` and
the ``--penalty-*`` flags of both training CLIs all read the definition
below: each field has its default, its check and its one-line help here,
and nowhere else. A new option is one field here plus its formula in each
framework (and one ``penalty_<name>`` field in ``TrainConfig``).

This module is framework-free (no JAX, no PyTorch).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from agp_common.errors import PenaltyOptionsError

#: Name of the input capture point (the input-gradient penalty of double backprop).
INPUT = "input"
NORMALIZATIONS = ("batch_mean", "per_example")
NORMS = ("squared_l2", "l2")
APPROXIMATIONS = ("exact", "finite_difference")


def check_penalty_weight(value: Any, where: str = "penalized_loss") -> None:
    """``ModelInputError`` (a ``ValueError``) unless ``value`` is one finite number >= 0.

    ``value``: a Python number or a host array (``np.asarray`` of a concrete JAX array or of a
    tensor); ``jax_impl.validation`` and ``torch_ref.validation`` skip traced values.
    """
    import numpy as np  # NumPy only, like the rest of agp_common

    from agp_common.errors import ModelInputError

    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 0 or not (np.issubdtype(array.dtype, np.floating)
                                                or np.issubdtype(array.dtype, np.integer)):
        shape = "" if array is None else f" of shape {array.shape} and dtype {array.dtype}"
        raise ModelInputError(f"{where}: penalty_weight must be one number (a scalar), got {value!r}{shape}")
    if not (np.isfinite(array) and array >= 0):
        raise ModelInputError(f"{where}: penalty_weight must be a finite number >= 0, got {array.item()!r}")


class PenaltyOptionError(ValueError):
    """A bad ``PenaltyOptions`` value; ``field`` names the option (the CLI turns it into its flag)."""

    def __init__(self, field: str, expected: str, value: Any):
        self.field, self.expected, self.value = field, expected, value
        super().__init__(f"{field} must be {expected}, got {value!r}")


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _positive_finite(value: Any) -> bool:
    return _real(value) and value > 0


#: Largest ``every``: JAX counts steps in int32, so a larger period would overflow ``step % every``.
MAX_EVERY = 2**31 - 1


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_EVERY


def _option(default: Any, help: str, *, choices: Sequence[str] | None = None,
            check: Callable[[Any], bool] | None = None, expected: str = "", metavar: str | None = None):
    """A ``PenaltyOptions`` field: its default, the CLI help, and how a value is checked."""
    if choices is not None:
        check, expected = (lambda v, c=tuple(choices): v in c), f"one of {tuple(choices)}"
    metadata = {"help": help, "choices": choices, "check": check, "expected": expected, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


def _layer_names(value: Iterable[str] | str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def _layer_weight_pairs(value: Mapping[str, float] | Iterable | None) -> tuple[tuple[str, float], ...] | None:
    if value is None:
        return None
    pairs = value.items() if isinstance(value, Mapping) else value
    return tuple((str(name), weight) for name, weight in pairs)


@dataclasses.dataclass(frozen=True)
class PenaltyOptions:
    """How the activation gradient penalty is computed: everything but its weight ``w``.

    With ``g_l = d loss / d a_l`` (``loss`` the batch mean), ``G_{l,i} =
    d loss_i / d a_{l,i}`` (example i's own loss), ``lambda_l`` the layer
    weights and ``phi(s) = s`` (``"squared_l2"``) or ``sqrt(s)`` (``"l2"``)::

        batch_mean:   penalty = sum_l lambda_l phi(||g_l||^2)                 (the seed's, lambda = 1)
        per_example:  penalty = sum_l lambda_l (1/B) sum_i phi(||G_{l,i}||^2)

    Fields (defaults are the seed answer's recipe):

    * ``layers``: capture names to penalise; ``None`` = every capture point of
      the model (never ``"input"``); ``"input"`` is the model's input itself.
    * ``normalization``: ``"batch_mean"`` or ``"per_example"``.
    * ``norm``: ``"squared_l2"`` or ``"l2"``.
    * ``layer_weights``: ``{layer: lambda_l}``, missing layers weigh 1 (kept as
      ``(name, weight)`` pairs in the given order, so the object stays hashable).
    * ``approx``: ``"exact"`` (double backprop) or ``"finite_difference"``
      (Finlay & Oberman 2019), with step ``fd_step``.
    * ``every``: lazy regularisation, the penalty (weight ``every * w``) on
      steps 0, k, 2k, ... only. Read by the training steps and
      ``lazy_value_and_grad``; one call of ``penalized_loss`` always computes it.

    Every value is checked when the object is made (``PenaltyOptionError``,
    a ``ValueError`` naming the option); layer names are checked against the
    model when it is used. Hashable, so it can be a static argument of ``jax.jit``.

    >>> PenaltyOptions(norm="l2", layers="relu2").layers
    ('relu2',)
    """

    layers: tuple[str, ...] | None = _option(
        None, "comma-separated capture points or module paths to penalise, e.g. relu1,relu2, input or "
              "layer1.0,layer2.0; not set: every capture point of the model (relu1,relu2 for the answer's "
              "CNN), not the input", metavar="NAMES")
    normalization: str = _option(
        "batch_mean", "batch_mean: gradients of the batch-mean loss (the answer's); per_example: mean over "
                      "examples of each example's own gradient norm (B times stronger)",
        choices=NORMALIZATIONS)
    norm: str = _option("squared_l2", "norm of each activation gradient: squared L2 (the answer's) or L2",
                        choices=NORMS)
    layer_weights: tuple[tuple[str, float], ...] | None = _option(
        None, "per-layer weights lambda_l as name=value pairs, e.g. relu1=1,relu2=0.5; not set: all 1",
        metavar="NAME=W,...")
    approx: str = _option("exact", "exact double backprop, or the first-order finite difference "
                                   "(Finlay & Oberman 2019)", choices=APPROXIMATIONS)
    fd_step: float = _option(1e-3, "step h of approx finite_difference, in activation units",
                             check=_positive_finite, expected="a finite number > 0", metavar="H")
    every: int = _option(1, "lazy regularisation: the penalty every k steps, with weight k*w",
                         check=_positive_int, metavar="K",
                         expected=f"a positive integer number of steps, at most {MAX_EVERY}")

    def __post_init__(self):
        object.__setattr__(self, "layers", _layer_names(self.layers))
        object.__setattr__(self, "layer_weights", _layer_weight_pairs(self.layer_weights))
        for field in dataclasses.fields(self):
            check, value = field.metadata["check"], getattr(self, field.name)
            if check is not None and not check(value):
                raise PenaltyOptionError(field.name, field.metadata["expected"], value)
        if self.layers is not None:
            if not self.layers:
                raise PenaltyOptionError("layers", "a non-empty list of capture names (or None for all)", ())
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"penalty layers contain duplicates: {list(self.layers)}")
        for _, weight in self.layer_weights or ():
            if not (_real(weight) and weight >= 0):
                raise PenaltyOptionError("layer_weights", "finite numbers >= 0 by layer name",
                                         dict(self.layer_weights))

    @property
    def layer_weight_map(self) -> dict[str, float] | None:
        """``layer_weights`` as a dict (``None`` when not set)."""
        return None if self.layer_weights is None else dict(self.layer_weights)

    def weight_of(self, layer: str) -> float:
        """``lambda_layer`` (1 when not given)."""
        return (self.layer_weight_map or {}).get(layer, 1.0)

    def replace(self, **changes: Any) -> PenaltyOptions:
        """A copy with ``changes`` applied (checked like a new object)."""
        return dataclasses.replace(self, **changes)

    def changed(self) -> dict[str, Any]:
        """The fields that differ from the defaults, by name."""
        default = PenaltyOptions()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    @property
    def is_seed_recipe(self) -> bool:
        """True when the formula is the seed answer's: exact, batch mean, squared L2, no layer weights."""
        return not (set(self.changed()) - {"layers", "every"})


#: Names of the fields of ``PenaltyOptions`` (the option keywords both ``penalized_loss`` accept).
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(PenaltyOptions))


def resolve_options(
    options: PenaltyOptions | None = None,
    layers: Sequence[str] | str | None = None,
    **keywords: Any,
) -> PenaltyOptions:
    """One ``PenaltyOptions`` from an options object, an explicit ``layers`` and option keywords.

    ``penalized_loss(..., layers=["relu2"], norm="l2")`` and
    ``penalized_loss(..., options=PenaltyOptions(layers=("relu2",), norm="l2"))``
    mean the same; keywords and ``layers`` override ``options``' fields. An
    unknown keyword is a ``TypeError`` listing the valid ones.
    """
    unknown = sorted(set(keywords) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown penalty option(s) {unknown}; the options are {list(OPTION_NAMES)} "
                        "(see PenaltyOptions)")
    if options is not None and not isinstance(options, PenaltyOptions):
        raise TypeError(f"options must be a PenaltyOptions, got {type(options).__name__}")
    if layers is not None:
        keywords["layers"] = layers
    base = options if options is not None else PenaltyOptions()
    return base.replace(**keywords) if keywords else base


def wants_input(layers: Sequence[str] | str | None) -> bool:
    """True when ``layers`` names the input capture point (``None``, "all layers", never does)."""
    return INPUT in (_layer_names(layers) or ())


#: The error of a penalty over zero capture points (both frameworks raise it, word for word).
NO_CAPTURE_POINTS = (
    "the model has no capture points, so the penalty would be 0: mark activations with capture(...) in the "
    "model, or name modules with capture_modules={name: module path} (capture_points(model, x) lists them), "
    f"or penalise the input with layers=[{INPUT!r}]"
)


def min_fd_step(eps: float) -> float:
    """Smallest ``fd_step`` accepted for activations whose dtype has machine epsilon ``eps``: ``100 * eps``.

    The forward difference ``(loss(a + h v) - loss(a)) / h`` carries a rounding
    error of about ``eps * |loss| / (h * |g|)`` relative to ``|g|``; for
    unit-scale loss and gradient that is over 1% below ``h = 100 eps`` and
    100% at ``h = eps`` (``a + h v`` rounds to ``a``). 1.2e-5 in float32,
    2.2e-14 in float64; the best step for unit-scale activations is about
    ``sqrt(eps)`` (3e-4 in float32), the default 1e-3 is near it.
    """
    return 100.0 * eps


def check_fd_step(fd_step: float, eps: float, dtype_name: str) -> None:
    """Raise a one-line ``ValueError`` when ``fd_step`` is below ``min_fd_step(eps)`` for ``dtype_name``."""
    low = min_fd_step(eps)
    if fd_step < low:
        raise PenaltyOptionsError(
            f"fd_step={fd_step!r} is too small for {dtype_name} activations: the finite difference would be "
            f"rounding noise; use fd_step >= {low:.2g} (100 x machine epsilon; about {math.sqrt(eps):.1g} is "
            "best for unit-scale activations)")


def select_layers(available: Sequence[str], layers: Sequence[str] | str | None) -> tuple[str, ...]:
    """Validate ``layers`` against the model's capture points; ``None`` means all of them.

    ``"input"`` is always accepted as well (the input capture point), but
    ``None`` never includes it. Raises a one-line ``ValueError`` listing the
    valid names for an unknown, empty or duplicated choice, and
    ``NO_CAPTURE_POINTS`` for ``None`` on a model without capture points (a
    penalty over nothing is 0: an error, never a silent 0).
    """
    if layers is None:
        if not available:
            raise PenaltyOptionsError(NO_CAPTURE_POINTS)
        return tuple(available)
    layers = _layer_names(layers)
    unknown = [name for name in layers if name not in available and name != INPUT]
    if unknown:
        raise ValueError(
            f"unknown penalty layer(s) {unknown}; the model's capture points are {list(available)}"
            f" (or {INPUT!r} for the input itself)"
        )
    if not layers:
        raise ValueError(f"layers is empty; choose from {list(available)} or pass None for all")
    if len(set(layers)) != len(layers):
        raise ValueError(f"penalty layers contain duplicates: {list(layers)}")
    return layers


def check_layer_weights(options: PenaltyOptions, layers: Sequence[str]) -> None:
    """Raise a ``ValueError`` when ``layer_weights`` names a layer that is not penalised."""
    unknown = [name for name, _ in options.layer_weights or () if name not in layers]
    if unknown:
        raise PenaltyOptionsError(
            f"layer_weights names {unknown} that are not penalised layers {list(layers)}")


def check_examples_interact(options: PenaltyOptions, examples_interact: bool) -> None:
    """Raise a ``ValueError`` for the finite difference per example when examples interact.

    Each example is shifted along its own direction in one forward pass, which is exact only
    when an example's loss does not depend on the others' activations (no train-mode BatchNorm).
    """
    if options.approx == "finite_difference" and options.normalization == "per_example" and examples_interact:
        raise PenaltyOptionsError(
            "approx='finite_difference' with normalization='per_example' needs independent examples; "
            "with interacting examples (BatchNorm in train mode) use approx='exact'"
        )


def check_penalty_options(**options: Any) -> None:
    """Raise the one-line ``ValueError`` of ``PenaltyOptions`` for a bad option value (by keyword)."""
    PenaltyOptions(**options)
