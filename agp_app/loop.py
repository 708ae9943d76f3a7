"""The framework-free outer loop shared by both trainers: schedule, logging, checks.

The framework supplies three callbacks: run one step on given example
indices, evaluate on the test split, save a checkpoint. ``run_loop`` decides
when to evaluate and checkpoint, writes metrics.jsonl (and TensorBoard),
shows progress, and stops at the first non-finite loss, penalty or gradient
*before* that state can be checkpointed. With ``handle_signals``, SIGTERM and
Ctrl-C end the current step, save a checkpoint and raise ``Interrupted``.

A step's metrics may stay on the device (JAX): with ``fetch``, the loop
fetches those of all pending steps in one call every ``fetch_every`` steps,
after the first step, and before every evaluation, checkpoint and stop, so the
host never waits for the device in between (the Flax examples' pattern). The
trainer must then leave its state unchanged by a step whose checked
quantities are not finite (``CHECKED_FINITE``), so that the fetch that finds
it can still stop before anything is saved, naming that step.

With ``train_steps`` and ``steps_per_dispatch`` N > 1 the loop hands the framework several steps'
indices at once (JAX: one compiled call, ``agp_app.jax_train.dispatch``). A chunk never crosses an
evaluation, a checkpoint or the end (``chunk_length``), so everything due after a step runs after
the chunk that ends with it, with the state of exactly that step; a signal is seen after the chunk
and the checkpoint saved is that of its last step, the steps applied. A chunk may cross an epoch
boundary: every step's indices are known ahead (``BatchOrder``), and a partial last batch has the
same padded shape.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agp_app.batching import BatchOrder
from agp_app.config import TrainConfig
from agp_app.errors import Interrupted, NonFiniteError
from agp_app.interrupts import GracefulStop
from agp_app.runlog import PENALTY_APPLIED, MetricsLog, Progress, TensorBoardLog, describe

#: Quantities that must stay finite; the first one that does not stops the run.
CHECKED_FINITE = ("loss", "penalty", "total", "grad_norm")


@dataclasses.dataclass
class LoopResult:
    """What ``run_loop`` saw: the last train and eval records, and the steps it ran."""

    last_train: dict[str, Any] | None
    last_eval: dict[str, Any] | None
    steps_run: int
    wall_s: float


def period(every: int | None, steps_per_epoch: int) -> int:
    """Steps between two evaluations/checkpoints: ``every`` (``--eval-every``, ``--checkpoint-every``),
    or an epoch when it is not set."""
    return every if every is not None else steps_per_epoch


def is_due(step: int, every: int | None, steps_per_epoch: int, total: int) -> bool:
    """Evaluate/checkpoint after 1-based ``step``: every ``every`` steps (or epoch ends), and at the end."""
    return step == total or step % period(every, steps_per_epoch) == 0


def chunk_length(step0: int, total: int, steps_per_dispatch: int, periods: tuple[int, ...]) -> int:
    """Steps in the chunk that starts at 0-based ``step0``: ``steps_per_dispatch`` N when the next
    boundary (a multiple of one of ``periods``, the evaluation's and the checkpoint's, or ``total``)
    is at least N steps away, else 1.

    Only two lengths, N and 1, so the chunked program compiles once and the single step once, whatever
    the periods and the resumed step; the (at most N - 1) steps before a boundary run one by one.
    """
    boundary = min([total, *((step0 // p + 1) * p for p in periods)])
    return steps_per_dispatch if boundary - step0 >= steps_per_dispatch else 1


def check_finite(step: int, record: dict[str, Any], last_saved: int | None = None) -> None:
    """``NonFiniteError`` naming the step and the first non-finite quantity of ``record``.

    ``last_saved``: step of the newest checkpoint, for the message (None: none yet).
    """
    for key in CHECKED_FINITE:
        value = record.get(key)
        if value is not None and not math.isfinite(value):
            kept = (f"the newest checkpoint (step {last_saved}) is intact" if last_saved
                    else "no checkpoint was written")
            raise NonFiniteError(f"step {step}: {key} is {value}; training stopped before saving this state "
                                 f"({kept}); try a smaller --lr or --penalty-weight, or check the data")


def run_loop(
    config: TrainConfig,
    workdir: Path,
    order: BatchOrder,
    start_step: int,
    total: int,
    *,
    train_step: Callable[[Any], dict[str, Any]],
    evaluate: Callable[[], dict[str, float]],
    save: Callable[[int], None],
    main_process: bool = True,
    handle_signals: bool = False,
    fetch: Callable[[list[Any]], list[dict[str, Any]]] | None = None,
    fetch_every: int = 1,
    train_steps: Callable[[list[Any]], list[Any]] | None = None,
    steps_per_dispatch: int = 1,
) -> LoopResult:
    """Steps ``start_step + 1 .. total``; ``train_step(indices)`` returns the step's metrics.

    The metrics are floats, or with ``fetch`` anything that ``fetch(list of
    metrics) -> list of dicts of numbers`` turns into them (``jax.device_get``
    of on-device arrays), called every ``fetch_every`` steps and whenever the
    loop evaluates, saves or stops. Each record's ``step_time_s`` is the wall
    time from the start of the first step of its fetch to the end of the
    fetch, divided by the steps in it (one step per fetch without ``fetch``:
    that step's time; the first step of a run is fetched alone, so its
    compilation stays out of the others').

    ``handle_signals``: SIGTERM/SIGINT finish the current step, save its
    checkpoint and raise ``Interrupted`` (a second signal acts as usual).

    ``train_steps(list of indices) -> list of metrics`` with ``steps_per_dispatch`` N > 1: runs the
    steps in chunks of ``chunk_length`` (N, or 1 before a boundary, by ``train_step``); the first
    chunk is fetched alone, so its steps' ``step_time_s`` carry the compilation.
    """
    metrics = MetricsLog(workdir, resume_step=start_step, enabled=main_process,
                         eval_due=lambda s: is_due(s, config.eval_every, order.steps_per_epoch, total))
    board = TensorBoardLog(workdir, start_step) if config.tensorboard and main_process else None
    progress = Progress(total, start_step, quiet=config.quiet, enabled=main_process)
    if start_step:
        progress.log(f"resuming from the checkpoint at step {start_step} in {workdir}")
    last_train = last_eval = None
    last_saved = start_step or None
    t_start = time.perf_counter()
    pending: list[tuple[int, int, int, Any]] = []  # (step, epoch, examples, metrics not fetched yet)
    t_pending = t_start  # start of the first pending step

    def write_pending() -> None:
        nonlocal last_train
        fetched = fetch([p[3] for p in pending]) if fetch is not None else [p[3] for p in pending]
        per_step = (time.perf_counter() - t_pending) / len(pending)
        for (step, epoch, examples, _), values in zip(pending, fetched, strict=True):
            record = {"step": step, "epoch": epoch, "split": "train",
                      **{k: float(v) for k, v in values.items()}, "lr": float(values.get("lr", config.lr)),
                      "examples": examples, "step_time_s": per_step,
                      "examples_per_s": examples / per_step if per_step > 0 else math.nan}
            if config.penalty_weight == 0 or (step - 1) % config.penalty_every:
                # measured but not applied (w = 0), or a plain step of --penalty-every k (no penalty
                # computed): marked so (runlog's docstring), and the progress lines leave it out
                record[PENALTY_APPLIED] = False
            check_finite(step, record, last_saved)
            last_train = record
            metrics.write(record)
            if board is not None:
                board.write(record)
            progress.update(step, epoch, record)
        pending.clear()

    periods = tuple(period(every, order.steps_per_epoch)
                    for every in (config.eval_every, config.checkpoint_every))
    chunked = train_steps is not None and steps_per_dispatch > 1
    stop = GracefulStop(handle_signals).__enter__()  # left in the ``finally`` below
    try:
        step = start_step
        while step < total:
            step0 = step  # 0-based index of the chunk's first step
            n = chunk_length(step0, total, steps_per_dispatch, periods) if chunked else 1
            chunk = [order.indices(s) for s in range(step0, step0 + n)]
            if not pending:
                t_pending = time.perf_counter()
            results = train_steps(chunk) if n > 1 else [train_step(chunk[0])]
            for i, (indices, result) in enumerate(zip(chunk, results, strict=True)):
                pending.append((step0 + i + 1, order.epoch_of(step0 + i), len(indices), result))
            step, epoch = step0 + n, order.epoch_of(step0 + n - 1)  # the chunk's last step
            eval_due = is_due(step, config.eval_every, order.steps_per_epoch, total)
            save_due = is_due(step, config.checkpoint_every, order.steps_per_epoch, total)
            first = step0 == start_step
            if len(pending) >= fetch_every or first or eval_due or save_due or stop.requested:
                write_pending()  # raises at a non-finite step before anything below runs
            if eval_due:
                last_eval = {"step": step, "epoch": epoch, "split": "eval", **evaluate()}
                metrics.write(last_eval)
                if board is not None:
                    board.write(last_eval)
                progress.log(f"step {step}/{total} (epoch {epoch + 1}) {describe(last_eval)}")
            if save_due or stop.requested:  # a signal may also arrive during the evaluation or the save
                if pending:
                    write_pending()
                metrics.sync()
                save(step)
                last_saved = step
            if stop.requested:  # SIGTERM/Ctrl-C: this step's state is checkpointed, then stop
                if last_saved != step:
                    if pending:
                        write_pending()
                    metrics.sync()
                    save(step)
                raise Interrupted(stop.signum, step, str(workdir))
    finally:
        stop.__exit__()
        progress.close()
        metrics.close()
        if board is not None:
            board.close()
    return LoopResult(last_train, last_eval, total - start_step, time.perf_counter() - t_start)
