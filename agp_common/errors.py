"""The exceptions the training CLIs turn into one line and an exit status.

``UsageError``: a problem the user can fix (flags, data, workdir, checkpoint);
``main`` prints ``error: <message>`` on stderr and exits with ``EXIT_USAGE``
(2, like argparse). ``ModelInputError`` (a ``ValueError`` raised by the
library's input checks) is reported the same way. ``NonFiniteError``: training
produced NaN/Inf; ``main`` prints the message and exits with
``EXIT_NON_FINITE`` (1). ``Interrupted``: SIGTERM or Ctrl-C stopped the run
after a checkpoint was saved; ``main`` exits with ``128 + signal number``
(143 for SIGTERM, 130 for Ctrl-C), the shell's convention. Anything else is a
bug and keeps its traceback. ``--debug`` shows the traceback in every case.
"""

from __future__ import annotations

import signal
import sys
import traceback

#: Exit status of the CLIs for usage and input errors (argparse uses 2 as well).
EXIT_USAGE = 2
#: Exit status when the loss, penalty or gradient became NaN or Inf.
EXIT_NON_FINITE = 1


class UsageError(Exception):
    """A problem the user can fix: the message says what was expected and what was found."""


class NonFiniteError(RuntimeError):
    """A training quantity became NaN or Inf; the message names the step and the quantity."""


class ModelInputError(ValueError):
    """Arrays passed to a model or loss do not have the shape or dtype it needs (a ``ValueError``).

    Raised by ``jax_impl.validation`` and ``torch_ref.validation``; the CLIs report it like a
    ``UsageError`` (one line, exit 2).
    """


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped training after step ``step``, whose checkpoint was saved."""

    def __init__(self, signum: int, step: int, workdir: str):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; its checkpoint is saved in {workdir}; "
                         "run the same command to resume")

    @property
    def exit_status(self) -> int:
        """``128 + signum``: 143 for SIGTERM, 130 for SIGINT (Ctrl-C)."""
        return 128 + self.signum


#: What a CLI reports as one line; anything else is a bug and keeps its traceback.
REPORTED_ERRORS = (UsageError, ModelInputError, NonFiniteError, Interrupted)


def report_error(error: BaseException, debug: bool = False) -> int:
    """Print ``error`` as one line on stderr (after its traceback with ``debug``); return the exit status.

    ``stopped: ...`` and ``128 + signum`` for ``Interrupted``; ``error: ...`` and
    ``EXIT_NON_FINITE`` for ``NonFiniteError``; ``error: ...`` and ``EXIT_USAGE`` otherwise.
    """
    if debug:
        traceback.print_exception(error)
    print(f"{'stopped' if isinstance(error, Interrupted) else 'error'}: {error}", file=sys.stderr, flush=True)
    if isinstance(error, Interrupted):
        return error.exit_status
    return EXIT_NON_FINITE if isinstance(error, NonFiniteError) else EXIT_USAGE
