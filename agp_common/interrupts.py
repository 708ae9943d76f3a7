"""Stopping cleanly on SIGTERM / Ctrl-C, and the pause points the kill tests use.

``GracefulStop``: while active, SIGTERM and SIGINT only set a flag; the
training loop finishes the current step, saves a checkpoint and raises
``Interrupted``. The first signal restores the previous handlers, so a second
Ctrl-C (or SIGTERM) stops the process at once, without waiting for the save
(what is on disk stays consistent either way: every write is atomic).

``pause_point(where, step)``: a test hook. When the environment variable
``AGP_TEST_PAUSE`` lists ``where:step`` (comma-separated, e.g.
``after_step:3,in_save:4``), the process prints ``AGP_TEST_PAUSED <where>
<step>`` on stderr and waits (up to ``PAUSE_SECONDS``, or until a stop is
requested) so that a test can SIGKILL or SIGTERM it at that exact point. Unset,
it costs one dictionary lookup. The points: ``before_save`` (the step's
metrics are written, its checkpoint, if due, is not), ``in_save`` (inside the
checkpoint write: JAX after orbax wrote the temporary folder and before it is
renamed; PyTorch after the temporary file is written and before it is renamed)
and ``after_step`` (after the step's checkpoint, if any).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

PAUSE_ENV = "AGP_TEST_PAUSE"
PAUSE_SECONDS = 120.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: The active ``GracefulStop`` (pause points inside a save return when it is triggered).
_active: GracefulStop | None = None


class GracefulStop:
    """Context manager turning SIGTERM/SIGINT into ``self.signum`` (None until one arrives).

    Inactive (handlers untouched) when ``enabled`` is False or outside the main
    thread, where Python cannot install signal handlers.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()  # a second signal acts as usual (Ctrl-C twice aborts at once)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> GracefulStop:
        global _active
        _active = self
        if self.enabled:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        self._restore()


def pause_point(where: str, step: int, stop: GracefulStop | None = None) -> None:
    """Test hook: wait here if ``AGP_TEST_PAUSE`` names ``where:step`` (see the module docstring)."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec or f"{where}:{step}" not in spec.split(","):
        return
    print(f"AGP_TEST_PAUSED {where} {step}", file=sys.stderr, flush=True)
    stop = stop or _active
    deadline = time.monotonic() + PAUSE_SECONDS
    while time.monotonic() < deadline and not (stop is not None and stop.requested):
        time.sleep(0.01)
