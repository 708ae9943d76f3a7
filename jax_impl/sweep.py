"""``python -m jax_impl.sweep``: what the penalty does, as an experiment over layers, weights and seeds.

The entry point only; the sweep is an application on top of the library, in ``agp_app.sweep``
(``grid``, ``measures``, ``runner``, ``tables``, ``figures``, ``cli``; its docstring tells what
it measures and writes). ``import jax_impl`` does not import this module; the names below are
re-exported so that ``jax_impl.sweep.run_sweep`` and the like keep working.
"""

from __future__ import annotations

import sys

from agp_app import sweep as _sweep
from agp_app.sweep import *  # noqa: F403
from agp_app.sweep import main

__all__ = _sweep.__all__

if __name__ == "__main__":
    sys.exit(main())
