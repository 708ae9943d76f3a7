"""Start a CLI so that Ctrl-C or SIGTERM during its imports is one line, not a traceback.

``python -m jax_impl.train`` spends seconds importing JAX, Flax and the trainer before its
``main`` can install any signal handling; a signal then used to end the process with a
``KeyboardInterrupt`` traceback (SIGINT) or silently (SIGTERM). The entry points call ``run``,
which imports the CLI's module with handlers that print ``report_signal_stop``'s line and end
the process at once with status 128 + signum. Ending at once is safe there: nothing has been
written yet. (Raising from the handler is not: a signal that lands while a garbage-collection
callback runs, as JAX's does during its import, has its exception printed and ignored.) ``run``
calls ``agp_common.host_memory.keep_host_memory`` first: a CLI's process keeps its freed
temporaries for the next step instead of faulting them in again. This
module imports only the standard library, ``agp_app.errors``, ``agp_app.interrupts`` and
``agp_common.host_memory``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import threading
from collections.abc import Iterator

from agp_app.errors import report_signal_stop
from agp_app.interrupts import STOP_SIGNALS
from agp_common.host_memory import keep_host_memory


def _exit_now(signum, frame) -> None:
    os._exit(report_signal_stop(signum))


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """While active, SIGTERM/SIGINT print one line and end the process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _exit_now) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(module: str, function: str = "main") -> int:
    """``module.function()`` (a CLI's ``main``), its import covered by ``exit_on_signals``, after
    ``keep_host_memory()``."""
    keep_host_memory()
    with exit_on_signals():
        main = getattr(importlib.import_module(module), function)
    return main()
