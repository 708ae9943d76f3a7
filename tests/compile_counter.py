"""Count XLA compilations per function while active, with JAX's public monitoring API.

JAX reports each program it builds for a ``jax.jit`` cache miss as the event
``/jax/core/compile/backend_compile_duration`` (``fun_name="jit(<name>)"``, the wrapped function's
``__name__``; a ``functools.partial`` keeps its function's name), a persistent-cache hit included,
and each trace as ``/jax/core/compile/jaxpr_trace_duration`` (``fun_name="<name>"``). A call served
from the jit cache reports neither. So the number of ``jit(train_step)`` compilations seen while a
``CompileCounter`` is active is the number of times the train step was compiled for a new shape,
dtype or sharding (what ``chex.assert_max_traces`` bounds), with no counter in the shipped code.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from jax import monitoring

#: The event JAX records once per program built for a jit cache miss (jax._src.dispatch).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
#: The event JAX records once per trace of a jitted function.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


class CompileCounter:
    """``with CompileCounter() as counter: ...``, then ``counter.compilations("train_step")``.

    Counts the compilations (and traces) of every jitted function by name while the ``with`` block
    runs (also from other threads of the process: the listener is process-wide).
    """

    def __init__(self) -> None:
        self.compiles: Counter[str] = Counter()
        self.traces: Counter[str] = Counter()

    def _listener(self, event: str, duration: float, **kwargs: Any) -> None:
        name = kwargs.get("fun_name")
        if event == COMPILE_EVENT and name is not None:
            self.compiles[name.removeprefix("jit(").removesuffix(")")] += 1
        elif event == TRACE_EVENT and name is not None:
            self.traces[name] += 1

    def compilations(self, fun_name: str) -> int:
        """Programs built so far for the jitted function named ``fun_name`` (its ``__name__``)."""
        return self.compiles[fun_name]

    def __enter__(self) -> CompileCounter:
        monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc_info: object) -> None:
        monitoring.unregister_event_duration_listener(self._listener)
