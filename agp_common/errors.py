"""The exceptions the training CLIs turn into one line and an exit status.

``UsageError``: a problem the user can fix (flags, data, workdir, checkpoint);
``main`` prints ``error: <message>`` on stderr and exits with ``EXIT_USAGE``
(2, like argparse). ``NonFiniteError``: training produced NaN/Inf; ``main``
prints the message and exits with ``EXIT_NON_FINITE`` (1). Anything else is a
bug and keeps its traceback. ``--debug`` shows the traceback in every case.
"""

from __future__ import annotations

#: Exit status of the CLIs for usage and input errors (argparse uses 2 as well).
EXIT_USAGE = 2
#: Exit status when the loss, penalty or gradient became NaN or Inf.
EXIT_NON_FINITE = 1


class UsageError(Exception):
    """A problem the user can fix: the message says what was expected and what was found."""


class NonFiniteError(RuntimeError):
    """A training quantity became NaN or Inf; the message names the step and the quantity."""
