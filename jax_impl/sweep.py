"""``python -m jax_impl.sweep``: what the penalty does, as an experiment over layers, weights and seeds.

The entry point only; the sweep is an application on top of the library, in ``agp_app.sweep``
(``grid``, ``measures``, ``runner``, ``tables``, ``figures``, ``cli``; its docstring tells what
it measures and writes). ``import jax_impl`` does not import this module; the names below are
re-exported so that ``jax_impl.sweep.run_sweep`` and the like keep working.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before the heavy imports below: a Ctrl-C during them is one line
    from agp_app.launch import run

    sys.exit(run("agp_app.sweep"))

from agp_app import sweep as _sweep
from agp_app.sweep import *  # noqa: F403

__all__ = _sweep.__all__
