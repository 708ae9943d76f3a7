"""The error the libraries raise for bad inputs: ``ModelInputError`` (a ``ValueError``).

``jax_impl.validation`` and ``torch_ref.validation`` raise it; the CLIs report it like a usage
error (one line, exit 2). The CLIs' own exceptions and their reporter (``UsageError``,
``NonFiniteError``, ``WriteFailed``, ``Interrupted``, ``report_error``) live in ``agp_app.errors``
and are still importable from here, loaded only when asked for, so that ``import jax_impl`` does
not load the applications.
"""

from __future__ import annotations


class ModelInputError(ValueError):
    """Arrays passed to a model or loss do not have the shape or dtype it needs (a ``ValueError``).

    Raised by ``jax_impl.validation`` and ``torch_ref.validation``; the CLIs report it like a
    ``UsageError`` (one line, exit 2).
    """


class PenaltyOptionsError(ValueError):
    """The penalty's options do not fit the model or its dtype (a ``ValueError``): no capture points,
    ``fd_step`` lost in rounding, finite differences per example over interacting examples.

    Raised by ``agp_common.penalty_spec``'s checks, often only when a step is traced; the CLIs
    report it like a ``UsageError`` (one line, exit 2).
    """


def __getattr__(name: str):
    """The CLI errors (``UsageError``, ``report_error``, ...) from ``agp_app.errors``, on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    import agp_app.errors

    return getattr(agp_app.errors, name)
