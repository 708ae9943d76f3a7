"""``python -m torch_ref.train``: flags -> ``train_and_evaluate`` (the same flags as ``jax_impl.train``)."""

from __future__ import annotations

from collections.abc import Sequence

from agp_app.torch_train.checkpoints import FRAMEWORK
from agp_app.torch_train.trainer import train_and_evaluate
from agp_app.trainer import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: flags -> ``train_and_evaluate``.

    Usage and input errors: one line, exit 2; NaN/Inf in training: one line, exit 1;
    SIGTERM/Ctrl-C: checkpoint saved, one line, exit 143/130. ``--debug`` adds the traceback.
    """
    return run_cli(argv, "python -m torch_ref.train", FRAMEWORK,
                   lambda config: train_and_evaluate(config, handle_signals=True).summary)
