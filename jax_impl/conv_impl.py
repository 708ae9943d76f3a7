"""Which implementation of the convolution products a model runs: ``ConvImpl``, chosen once.

``resolve_conv_impl("auto" | "xla" | "canonical" | "im2col" | "onednn")``
turns a user's name into a ``ConvImpl`` when a model is built (``Net(...)``,
``Conv2D(...)``) or a step is configured (``jit_options``), never while a
convolution is traced; ``ConvImpl.conv(x, kernel)`` then runs it::

    impl = resolve_conv_impl("auto")      # ConvImpl.ONEDNN on CPU once built, else CANONICAL / XLA
    y = impl.conv(x, kernel)              # (B, H, W, Ci), (kh, kw, Ci, Co) -> (B, H', W', Co)

Resolving loads oneDNN's library if it is built (it never builds it: that
is ``python -m jax_impl.onednn_conv build``).
"""

from __future__ import annotations

import enum
import functools
import logging
import warnings

import jax

from jax_impl import conv_products, onednn_conv

__all__ = ["CONV_IMPLS", "ConvImpl", "conv2d_valid", "resolve_conv_impl"]

_log = logging.getLogger(__name__)


class ConvImpl(enum.StrEnum):
    """How ``Conv2D`` computes its convolution (a ``str``: ``ConvImpl.XLA == "xla"``).

    * ``XLA``: ``lax.conv_general_dilated`` with XLA's own derivatives (forward
      and reverse mode; the fastest on GPU and TPU).
    * ``CANONICAL``: the same convolution with ``conv_products.closed_under_vjp``'s
      rules: every derivative order is one of the three fast products (reverse
      mode to any order, no forward mode).
    * ``IM2COL``: patches and one matmul, plain autodiff.
    * ``ONEDNN``: ``CANONICAL``'s rules with oneDNN computing the float32
      products on CPU (``jax_impl.onednn_conv``; XLA's for other dtypes).
    """

    XLA = "xla"
    CANONICAL = "canonical"
    IM2COL = "im2col"
    ONEDNN = "onednn"

    def conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """VALID stride-1 cross-correlation: (B, H, W, Ci) * (kh, kw, Ci, Co) -> (B, H', W', Co)."""
        if self is ConvImpl.IM2COL:
            return conv_products.im2col_conv(x, kernel)
        if self is ConvImpl.CANONICAL:
            return conv_products.canonical_conv(x, kernel)
        if self is ConvImpl.ONEDNN:
            return onednn_conv.onednn_conv(x, kernel)
        return conv_products.conv_forward(x, kernel)


#: The names ``resolve_conv_impl`` accepts (``--conv-impl``): ``"auto"`` and every ``ConvImpl``.
CONV_IMPLS = ("auto", *(impl.value for impl in ConvImpl))


def resolve_conv_impl(impl: str | ConvImpl, backend: str | None = None) -> ConvImpl:
    """The ``ConvImpl`` that ``impl`` runs as on ``backend`` (default: JAX's default backend).

    ``"auto"``: on CPU ``ONEDNN`` when its library is built and loads, else
    ``CANONICAL`` with one logged line (once per process) saying why; ``XLA``
    on GPU and TPU. ``"onednn"``: itself on CPU when it can run; otherwise
    ``CANONICAL`` (its exact stand-in), silently off CPU and with one
    ``RuntimeWarning`` naming the reason and the fix on CPU. Every other name
    maps to its member; anything else is a ``ValueError``.

    Why (``python -m benchmarks.step_time``, docs/performance.md): on CPU, XLA
    differentiates the input-gradient convolution into a window-reversed
    convolution that its CPU runtime runs through a naive loop, so the
    penalised step uses the closed rules there, with oneDNN's kernels where
    they are built (the penalised step ~1.7-2x faster again at batch 32-128 on
    a 2-core EPYC); on GPU and TPU the native convolution (``XLA``) is fastest.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    backend = backend or jax.default_backend()
    if impl == "auto":
        if backend != "cpu":
            return ConvImpl.XLA
        if onednn_conv.available():
            return ConvImpl.ONEDNN
        _log_auto_fallback(onednn_conv.unavailable_reason())
        return ConvImpl.CANONICAL
    if impl == ConvImpl.ONEDNN:
        if backend != "cpu":
            return ConvImpl.CANONICAL  # oneDNN is a CPU library; the canonical products: its exact stand-in
        if not onednn_conv.available():
            _warn_onednn_unavailable(onednn_conv.unavailable_reason())
            return ConvImpl.CANONICAL
    return ConvImpl(impl)


@functools.cache
def _log_auto_fallback(reason: str) -> None:
    """One line per process (and reason): "auto" is the default, so a warning would be noise in every
    process of a machine without oneDNN; a log line still says why the slower path runs."""
    _log.warning("conv_impl='auto' uses the 'canonical' convolutions: oneDNN's are unavailable (%s). "
                 "For the faster ones: %s.", reason, onednn_conv.INSTALL_HINT)


@functools.cache
def _warn_onednn_unavailable(reason: str) -> None:
    """One warning per process (and reason), however many layers ask for ``"onednn"``."""
    warnings.warn(f"conv_impl='onednn' is unavailable ({reason}); using 'canonical' instead. "
                  f"Fix: {onednn_conv.INSTALL_HINT}.", RuntimeWarning, stacklevel=4)


def conv2d_valid(x: jax.Array, kernel: jax.Array, impl: str | ConvImpl = ConvImpl.XLA) -> jax.Array:
    """Cross-correlation, VALID padding, stride 1: (B,H,W,Ci) * (kh,kw,Ci,Co) -> (B,H',W',Co).

    ``impl``: a ``ConvImpl`` or its name (``"auto"`` and ``"onednn"`` go
    through ``resolve_conv_impl``; resolve once outside a traced function to
    keep its work out of every trace).
    """
    return (impl if isinstance(impl, ConvImpl) else resolve_conv_impl(impl)).conv(x, kernel)
