"""The exceptions the CLIs turn into one line and an exit status, and the reporter that does it.

``UsageError``: a problem the user can fix (flags, data, workdir, checkpoint);
``main`` prints ``error: <message>`` on stderr and exits with ``EXIT_USAGE``
(2, like argparse). ``ModelInputError`` (a ``ValueError`` raised by the
library's input checks) and ``PenaltyOptionsError`` (the penalty's options do not fit the model,
found when a step is traced) are reported the same way. ``NonFiniteError``: training
produced NaN/Inf; ``main`` prints the message and exits with
``EXIT_NON_FINITE`` (1). ``WriteFailed``: a file of the run (checkpoint,
metrics.jsonl, config.json, a plot) could not be written, e.g. the disk is
full; ``main`` prints what and where and exits with ``EXIT_NON_FINITE`` (1)
too (the newest checkpoint on disk is intact). ``Interrupted``: SIGTERM or Ctrl-C stopped the run
after a checkpoint was saved; ``main`` exits with ``128 + signal number``
(143 for SIGTERM, 130 for Ctrl-C), the shell's convention. The same signals outside the
training loop (start-up, final evaluation, plots: ``agp_app.interrupts.SignalStop``) are one
``stopped:`` line with the same status (``report_signal_stop``). Anything else is a
bug and keeps its traceback. ``--debug`` shows the traceback in every case.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import traceback

from agp_common.errors import ModelInputError, PenaltyOptionsError

#: Exit status of the CLIs for usage and input errors (argparse uses 2 as well).
EXIT_USAGE = 2
#: Exit status when the loss, penalty or gradient became NaN or Inf.
EXIT_NON_FINITE = 1


class UsageError(Exception):
    """A problem the user can fix: the message says what was expected and what was found."""


class NonFiniteError(RuntimeError):
    """A training quantity became NaN or Inf; the message names the step and the quantity."""


def write_error_reason(error: BaseException) -> str:
    """``No space left on device``: the ``OSError`` behind ``error`` (libraries such as orbax wrap it),
    else the first line of ``error``'s own message."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    code = re.search(r"os_error_code='?(\d+)", str(error))  # tensorstore's: "... [os_error_code='28']"
    if code:
        return os.strerror(int(code.group(1)))
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


class WriteFailed(RuntimeError):
    """A file of the run could not be written (disk full, quota, I/O error); training stopped.

    The message names the file and the reason; what was already saved is intact, and the same
    command resumes from the newest checkpoint once the cause (e.g. a full disk) is fixed.
    """

    def __init__(self, what: str, path: object, error: BaseException):
        reason = write_error_reason(error)
        super().__init__(f"could not write {what} {path} ({reason}); what was saved before is intact: free "
                         "space (or fix the folder) and run the same command to resume")


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
REPORTED_ERRORS = (UsageError, ModelInputError, PenaltyOptionsError, NonFiniteError, WriteFailed, Interrupted)


def report_error(error: BaseException, debug: bool = False) -> int:
    """Print ``error`` as one line on stderr (after its traceback with ``debug``); return the exit status.

    ``stopped: ...`` and ``128 + signum`` for ``Interrupted``; ``error: ...`` and
    ``EXIT_NON_FINITE`` for ``NonFiniteError`` and ``WriteFailed`` (failures during training);
    ``error: ...`` and ``EXIT_USAGE`` otherwise.
    """
    if debug:
        traceback.print_exception(error)
    print(f"{'stopped' if isinstance(error, Interrupted) else 'error'}: {error}", file=sys.stderr, flush=True)
    if isinstance(error, Interrupted):
        return error.exit_status
    return EXIT_NON_FINITE if isinstance(error, NonFiniteError | WriteFailed) else EXIT_USAGE


def report_signal_stop(signum: int, debug: bool = False, error: BaseException | None = None) -> int:
    """One line for SIGTERM/SIGINT outside the training loop (start-up, final evaluation, plots);
    returns ``128 + signum``. What was saved before is intact: every file is written atomically."""
    if debug and error is not None:
        traceback.print_exception(error)
    print(f"stopped: by {signal.Signals(signum).name} before the command finished; what was saved before is "
          "intact (every file is written whole or not at all): run the same command to go on",
          file=sys.stderr, flush=True)
    return 128 + signum
