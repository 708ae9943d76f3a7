"""The framework-free outer loop shared by both trainers: schedule, logging, checks.

The framework supplies three callbacks: run one step on given example
indices, evaluate on the test split, save a checkpoint. ``run_loop`` decides
when to evaluate and checkpoint, writes metrics.jsonl (and TensorBoard),
shows progress, and stops at the first non-finite loss, penalty or gradient
*before* that state can be checkpointed. With ``handle_signals``, SIGTERM and
Ctrl-C end the current step, save a checkpoint and raise ``Interrupted``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agp_common.batching import BatchOrder
from agp_common.config import TrainConfig
from agp_common.errors import Interrupted, NonFiniteError
from agp_common.interrupts import GracefulStop
from agp_common.runlog import PENALTY_APPLIED, MetricsLog, Progress, TensorBoardLog, describe

#: Quantities that must stay finite; the first one that does not stops the run.
CHECKED_FINITE = ("loss", "penalty", "total", "grad_norm")


@dataclasses.dataclass
class LoopResult:
    """What ``run_loop`` saw: the last train and eval records, and the steps it ran."""

    last_train: dict[str, Any] | None
    last_eval: dict[str, Any] | None
    steps_run: int
    wall_s: float


def is_due(step: int, every: int | None, steps_per_epoch: int, total: int) -> bool:
    """Evaluate/checkpoint after 1-based ``step``: every ``every`` steps (or epoch ends), and at the end."""
    period = every if every is not None else steps_per_epoch
    return step == total or step % period == 0


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
) -> LoopResult:
    """Steps ``start_step + 1 .. total``; ``train_step(indices)`` returns the step's metrics as floats.

    ``handle_signals``: SIGTERM/SIGINT finish the current step, save its
    checkpoint and raise ``Interrupted`` (a second signal acts as usual).
    """
    metrics = MetricsLog(workdir, resume_step=start_step, enabled=main_process)
    board = TensorBoardLog(workdir) if config.tensorboard and main_process else None
    progress = Progress(total, start_step, quiet=config.quiet, enabled=main_process)
    if start_step:
        progress.log(f"resuming from the checkpoint at step {start_step} in {workdir}")
    last_train = last_eval = None
    last_saved = start_step or None
    t_start = time.perf_counter()
    stop = GracefulStop(handle_signals).__enter__()  # left in the ``finally`` below
    try:
        for step0 in range(start_step, total):
            step, epoch = step0 + 1, order.epoch_of(step0)
            indices = order.indices(step0)
            t0 = time.perf_counter()
            values = train_step(indices)
            elapsed = time.perf_counter() - t0
            record = {"step": step, "epoch": epoch, "split": "train", **values, "lr": config.lr,
                      "examples": len(indices), "step_time_s": elapsed,
                      "examples_per_s": len(indices) / elapsed if elapsed > 0 else math.nan}
            if config.penalty_weight == 0:  # measured, not applied: marked so (runlog's docstring)
                record[PENALTY_APPLIED] = False
            check_finite(step, record, last_saved)
            last_train = record
            metrics.write(record)
            if board is not None:
                board.write(record)
            progress.update(step, epoch, record)
            if is_due(step, config.eval_every, order.steps_per_epoch, total):
                last_eval = {"step": step, "epoch": epoch, "split": "eval", **evaluate()}
                metrics.write(last_eval)
                if board is not None:
                    board.write(last_eval)
                progress.log(f"step {step}/{total} (epoch {epoch + 1}) {describe(last_eval)}")
            if is_due(step, config.checkpoint_every, order.steps_per_epoch, total) or stop.requested:
                metrics.sync()
                save(step)
                last_saved = step
            if stop.requested:  # SIGTERM/Ctrl-C: this step's state is checkpointed, then stop
                if last_saved != step:
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
