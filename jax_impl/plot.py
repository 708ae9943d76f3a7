"""``python -m jax_impl.plot WORKDIR``: redraw a run folder's PNG plots from its metrics.jsonl.

The plotting itself is framework-free (``agp_common.plot``) and works on
PyTorch run folders too.
"""

from __future__ import annotations

import sys

from agp_common.plot import main as _plot_main
from agp_common.plot import plot_run

__all__ = ["main", "plot_run"]


def main(argv=None) -> int:
    """Plot WORKDIR's metrics.jsonl as loss.png, grad_norms.png and accuracy.png."""
    return _plot_main(argv, prog="python -m jax_impl.plot")


if __name__ == "__main__":
    sys.exit(main())
