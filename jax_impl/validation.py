"""Input checks of ``Net`` and ``penalized_loss``: a clear ``ValueError`` instead of garbage.

JAX computes happily on many wrong inputs: integer labels out of range give a
finite, meaningless cross-entropy, float labels are silently cast, a batch of
the wrong length broadcasts. These checks turn such calls into one
``ModelInputError`` (a ``ValueError``) that names the expected shape.

Two kinds of checks:

* static ones (rank, size, channel count, dtype of ``x``; shape and dtype of
  ``y``): they only read shapes and dtypes, so they run at trace time and
  cost nothing under ``jax.jit``;
* value ones (labels in ``[0, K)``, finite inputs): only when the values are
  concrete (not tracers), i.e. in eager calls; under ``jit`` they are skipped
  (the training CLIs validate the data when they load it, see
  ``agp_common.data.validate_split``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agp_common.errors import ModelInputError
from agp_common.penalty_spec import check_fd_step as check_fd_step_for
from agp_common.penalty_spec import check_penalty_weight

__all__ = ["ModelInputError", "batch_leaf", "check_example_weights", "check_fd_step", "check_input_capture",
           "check_loss_inputs", "check_net_input", "check_penalized_loss_args", "is_concrete",
           "min_image_size"]

#: ``Net``: two stages of conv5x5 (VALID) + 2x2 max-pool, 64 channels after the second.
KERNEL = 5
FEATURES = 64


def stage_output_size(size: int) -> int:
    """Spatial size after conv5x5 (VALID) and a 2x2/2 max-pool (floor): ``(size - 4) // 2``."""
    return (size - KERNEL + 1) // 2


def min_image_size(side: int = 1) -> int:
    """Smallest input size whose two stages give ``side`` pixels: ``4 * side + 12`` (16 for 1, 32 for 5)."""
    return 4 * side + 12


def is_concrete(value: Any) -> bool:
    """True unless ``value`` is a JAX tracer (inside ``jit``, ``grad`` w.r.t. it, ``vmap``...)."""
    return not isinstance(value, jax.core.Tracer)


def _param_shape(variables: Any, layer: str, name: str) -> tuple[int, ...] | None:
    try:
        return tuple(variables["params"][layer][name].shape)
    except (KeyError, TypeError, AttributeError):
        return None


def check_net_input(x: Any, variables: Any = None, where: str = "Net") -> None:
    """Raise ``ModelInputError`` unless ``x`` fits ``Net`` (and its parameters, when bound).

    ``x``: NHWC images (B, H, W, C) of a floating dtype with H, W >= 16 (two
    conv5x5 + pool2 stages need that much). With ``variables`` (the bound
    module's ``self.variables``, empty during ``init``), C must be the
    ``conv1`` kernel's input channels and (H, W) must give the number of
    features the ``linear`` kernel was built for (64 * h' * w'). Static: only
    shapes and dtypes are read.
    """
    shape = tuple(x.shape)
    conv1 = _param_shape(variables, "conv1", "kernel") if variables is not None else None  # (5, 5, C, 32)
    linear = _param_shape(variables, "linear", "kernel") if variables is not None else None  # (F, K)
    channels = conv1[2] if conv1 is not None else None
    side = round(float(np.sqrt(linear[0] / FEATURES))) if linear is not None else None
    if side is not None and FEATURES * side * side != linear[0]:
        side = None  # non-square training images: the message cannot name (H, W)
    size = str(min_image_size(side)) if side else ("32" if linear is None else None)
    spatial = f"{size}, {size}" if size else "H, W"
    expected = f"(B, {spatial}, {channels if channels is not None else 'C'})"
    if len(shape) != 4:
        raise ModelInputError(f"{where}: expected NHWC images of shape {expected}, got shape {shape} "
                              f"(rank {len(shape)}, expected rank 4)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ModelInputError(f"{where}: expected floating-point images of shape {expected}, got dtype "
                              f"{x.dtype}; convert with x.astype(jnp.float32) (and scale to [0, 1])")
    _, h, w, c = shape
    if channels is not None and c != channels:
        raise ModelInputError(f"{where}: expected images of shape {expected} ({channels} channels, as the "
                              f"parameters were initialised), got shape {shape} ({c} channels)")
    low = min_image_size(1)
    if h < low or w < low:
        raise ModelInputError(f"{where}: images must be at least {low}x{low} for two conv5x5 + pool2 stages; "
                              f"expected shape {expected}, got {shape}")
    if linear is not None:
        h2, w2 = stage_output_size(stage_output_size(h)), stage_output_size(stage_output_size(w))
        if FEATURES * h2 * w2 != linear[0]:
            raise ModelInputError(f"{where}: expected images of shape {expected} (the size the parameters "
                                  f"were initialised for: {linear[0]} features before 'linear'), got shape "
                                  f"{shape} ({FEATURES * h2 * w2} features)")


def batch_leaf(x: Any) -> Any:
    """The array that gives the batch size of inputs ``x`` (an array, a tuple or a dict of arrays): its
    first leaf with at least one axis (``jax.tree.leaves`` order: dict keys sorted), or ``None``."""
    return next((leaf for leaf in jax.tree.leaves(x) if getattr(leaf, "ndim", 0) >= 1), None)


def _describe(x: Any) -> str:
    """The shapes of ``x``: ``(2, 8)`` for an array, ``{'input_ids': (2, 8), ...}`` for a dict."""
    return str(jax.tree.map(lambda leaf: tuple(getattr(leaf, "shape", ())), x))


def check_loss_inputs(x: Any, penalty_weight: Any) -> None:
    """Raise ``ModelInputError`` for a batch of 0 examples or a ``penalty_weight`` that is not one
    finite number >= 0 (checked when concrete; a traced weight under ``jit`` is not looked at).

    ``x``: an array, or a tuple/dict of arrays (positional/keyword inputs), whose batch size is
    the first axis of ``batch_leaf(x)``. Same checks as ``torch_ref.validation.check_loss_inputs``.
    """
    leaf = batch_leaf(x)
    if leaf is not None and leaf.shape[0] == 0:
        raise ModelInputError(f"penalized_loss: x holds no examples (shape {_describe(x)}); expected a "
                              "batch of at least one")
    if is_concrete(penalty_weight):
        check_penalty_weight(penalty_weight)


def check_example_weights(example_weights: Any) -> None:
    """Raise ``ModelInputError`` when concrete ``example_weights`` sum to 0 (all zero): the weighted
    mean ``sum_i m_i l_i / sum_i m_i`` would be 0/0 = NaN. Traced weights are not looked at."""
    if example_weights is None or not is_concrete(example_weights):
        return
    weights = np.asarray(example_weights, dtype=np.float64)
    if weights.size and not np.isfinite(weights).all():
        raise ModelInputError("penalized_loss: example_weights contain NaN or Inf; expected finite weights")
    if weights.sum() == 0:
        raise ModelInputError(f"penalized_loss: example_weights sum to 0 ({weights.size} weights); the "
                              "weighted mean loss sum_i m_i l_i / sum_i m_i would be NaN: give at least one "
                              "example a positive weight")


def check_input_capture(x: Any) -> None:
    """Raise ``ModelInputError`` unless ``x`` is one floating-point array: the ``"input"`` capture adds a
    perturbation to ``x`` and differentiates with respect to it, which needs real-valued inputs."""
    if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
        return
    what = f"dtype {x.dtype}" if hasattr(x, "dtype") else f"a {type(x).__name__} of inputs {_describe(x)}"
    raise ModelInputError(f"penalized_loss: the {'input'!r} capture needs x to be one floating-point array "
                          f"(the gradient w.r.t. integer token ids does not exist), got {what}; capture the "
                          "embedding's output instead, e.g. capture_modules={'emb': 'path/to/embeddings'}")


def check_fd_step(fd_step: float, dtypes: Any) -> None:
    """Raise a ``ValueError`` when ``fd_step`` is lost in rounding for the least precise of ``dtypes``
    (the perturbed activations): below ``agp_common.penalty_spec.min_fd_step(eps) = 100 eps``."""
    floats = [jnp.dtype(d) for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    if not floats:
        return
    coarsest = max(floats, key=lambda d: float(jnp.finfo(d).eps))
    check_fd_step_for(fd_step, float(jnp.finfo(coarsest).eps), coarsest.name)


def check_penalized_loss_args(model: Any, x: Any, y: Any, example_weights: Any = None,
                              loss_fn: Any = None) -> None:
    """Raise ``ModelInputError`` unless ``y`` (and ``example_weights``) fit the batch ``x``.

    ``y``: integer class labels of shape (B,), B = ``x.shape[0]``; when concrete,
    every label in ``[0, K)`` with K = ``model.num_classes`` (if the model has
    one). ``example_weights``: shape (B,). When concrete, ``x`` must be finite.
    With a custom ``loss_fn`` the labels can be anything it takes: only the
    batch size of ``x`` is checked then.
    """
    leaf = batch_leaf(x)
    batch = leaf.shape[0] if leaf is not None else None
    if example_weights is not None and batch is not None and tuple(example_weights.shape) != (batch,):
        raise ModelInputError(f"penalized_loss: expected example_weights of shape ({batch},) (one per "
                              f"example of x), got shape {tuple(example_weights.shape)}")
    for value in jax.tree.leaves(x):
        if (is_concrete(value) and hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.inexact)
                and not np.isfinite(np.asarray(value)).all()):
            raise ModelInputError("penalized_loss: x contains NaN or Inf; expected finite inputs")
    if loss_fn is not None:
        return
    num_classes = getattr(model, "num_classes", None)
    classes = f"[0, {num_classes})" if num_classes is not None else "[0, K)"
    if tuple(y.shape) != (batch,):
        raise ModelInputError(f"penalized_loss: expected labels y of shape ({batch},) (one integer class in "
                              f"{classes} per example of x {_describe(x)}), got shape {tuple(y.shape)}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ModelInputError(f"penalized_loss: expected integer class labels y of shape ({batch},) in "
                              f"{classes}, got dtype {y.dtype}; use y.astype(jnp.int32)")
    if is_concrete(y) and batch:
        labels = np.asarray(y)
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            raise ModelInputError(f"penalized_loss: labels must be class indices in {classes}, found values "
                                  f"from {low} to {high}")
