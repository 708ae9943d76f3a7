"""Stopping cleanly on SIGTERM / Ctrl-C.

``GracefulStop``: while active, SIGTERM and SIGINT only set a flag; the
training loop finishes the current step, saves a checkpoint and raises
``Interrupted``. The first signal restores the previous handlers, so a second
Ctrl-C (or SIGTERM) stops the process at once, without waiting for the save
(what is on disk stays consistent either way: every write is atomic).
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
        if self.enabled:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

