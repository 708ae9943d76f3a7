"""The penalty's options and layer names, shared by ``jax_impl`` and ``torch_ref``.

Both frameworks validate the same options against the same names with the
same messages, so they live here, framework-free.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Name of the input capture point (the input-gradient penalty of double backprop).
INPUT = "input"
NORMALIZATIONS = ("batch_mean", "per_example")
NORMS = ("squared_l2", "l2")
APPROXIMATIONS = ("exact", "finite_difference")


def wants_input(layers: Sequence[str] | str | None) -> bool:
    """True when ``layers`` names the input capture point (``None``, "all layers", never does)."""
    if layers is None:
        return False
    return INPUT in ((layers,) if isinstance(layers, str) else tuple(layers))


def select_layers(available: Sequence[str], layers: Sequence[str] | str | None) -> tuple[str, ...]:
    """Validate ``layers`` against the model's capture points; ``None`` means all of them.

    ``"input"`` is always accepted as well (the input capture point), but
    ``None`` never includes it. Raises a one-line ``ValueError`` listing the
    valid names for an unknown, empty or duplicated choice.
    """
    if layers is None:
        return tuple(available)
    if isinstance(layers, str):
        layers = (layers,)
    layers = tuple(layers)
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


def check_penalty_options(
    *,
    normalization: str = "batch_mean",
    norm: str = "squared_l2",
    approx: str = "exact",
    fd_step: float = 1e-3,
    every: int = 1,
) -> None:
    """Raise a one-line ``ValueError`` naming the expected values for a bad option."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if approx not in APPROXIMATIONS:
        raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}")
    if not (isinstance(fd_step, int | float) and fd_step > 0):
        raise ValueError(f"fd_step must be a positive number, got {fd_step!r}")
    if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
        raise ValueError(f"penalty every must be a positive integer number of steps, got {every!r}")
