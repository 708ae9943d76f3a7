"""``python -m jax_impl.plot WORKDIR``: redraw a run folder's PNG plots from its metrics.jsonl.

The entry point only; the plotting is an application, framework-free (``agp_app.plot``), and works
on PyTorch run folders too. ``import jax_impl`` does not import this module.
"""

from __future__ import annotations

import sys

from agp_app.plot import main as _plot_main
from agp_app.plot import plot_run

__all__ = ["main", "plot_run"]


def main(argv=None) -> int:
    """Plot WORKDIR's metrics.jsonl as loss.png, grad_norms.png and accuracy.png."""
    return _plot_main(argv, prog="python -m jax_impl.plot")


if __name__ == "__main__":
    sys.exit(main())
