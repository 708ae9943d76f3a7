"""Moved to ``agp_app.plot`` (the applications); this module keeps the old import path working.

``agp_common`` is the framework-free library layer (the penalty and attack specs, the errors the
libraries raise); flags, datasets, the run folder and the training loop live in ``agp_app``.
"""

from agp_app import plot as _moved
from agp_app.plot import *  # noqa: F403


def __getattr__(name: str):
    """Names ``import *`` leaves out (private helpers such as ``_names``), from ``agp_app.plot``."""
    return getattr(_moved, name)


if __name__ == "__main__":
    import sys

    sys.exit(_moved.main(prog="python -m agp_common.plot"))
