"""Stopping cleanly on SIGTERM / Ctrl-C.

``GracefulStop``: while active, SIGTERM and SIGINT only set a flag; the
training loop finishes the current step, saves a checkpoint and raises
``Interrupted``. The first signal restores the previous handlers, so a second
Ctrl-C (or SIGTERM) stops the process at once, without waiting for the save
(what is on disk stays consistent either way: every write is atomic).

``stop_on_signals``: around everything else a CLI does (start-up, loading the data, the final
evaluation and plots), SIGTERM and SIGINT raise ``SignalStop`` (a ``KeyboardInterrupt``, so
that no ``except Exception`` swallows it and ``atomic_write`` removes its temporary file), which
the CLI reports as one line with exit status ``128 + signum``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

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



class SignalStop(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived outside the training loop; ``signum`` says which."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _raise_stop(signum, frame) -> None:
    raise SignalStop(signum)


@contextlib.contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[None]:
    """While active, SIGTERM and SIGINT raise ``SignalStop`` in the main thread (no-op elsewhere).

    ``GracefulStop`` (the training loop) replaces these handlers while it runs and puts them
    back after, so a signal during training still ends the step and saves a checkpoint first.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
