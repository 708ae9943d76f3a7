"""The logs of a run: metrics.jsonl, TensorBoard events, the progress line and the summary.

``step`` in a record is the number of optimizer steps done when it was
measured (1 after the first update), the same number a checkpoint is saved
under, so resuming from checkpoint ``k`` keeps exactly the records with
``step <= k``.

With ``--penalty-weight 0`` the penalty is still measured (``penalty``,
``penalty/<layer>`` and ``act_grad_norm/<layer>`` are diagnostics of the
unpenalised model) but not part of the objective: every train record then
carries ``"penalty_applied": false`` (records of runs with w > 0 have no such
key), and the printed progress and summary lines leave the penalty out. With
``--penalty-every k`` (k > 1) the steps between penalty steps compute no
penalty at all (their ``penalty`` is 0): they carry the same flag.

The folder these logs are written in (its layout, the checks before a run writes there, its lock)
is ``agp_app.run_folder``; its names are importable from here too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from agp_app.errors import UsageError, WriteFailed
from agp_app.io import atomic_write_text, read_jsonl
from agp_app.run_folder import (  # the run folder's names, importable from here as before
    CAPTURE_POINTS,
    CONFIG_FILE,
    DATA_SIZE_FIELDS,
    FINGERPRINT,
    MAX_CONFIG_BYTES,
    METRICS_FILE,
    MODEL_SHAPE_FIELDS,
    TENSORBOARD_DIR,
    TENSORBOARD_MISSING,
    check_config_file,
    check_metrics_file,
    check_not_reset,
    check_saved_config,
    check_tensorboard_dir,
    check_utf8_path,
    config_record,
    has_saved_state,
    hold_workdir,
    prepare_workdir,
    write_config,
)

__all__ = [  # the logs (this module) and the run folder's names (agp_app.run_folder)
    "CAPTURE_POINTS", "CONFIG_FILE", "DATA_SIZE_FIELDS", "FINGERPRINT", "MAX_CONFIG_BYTES", "METRICS_FILE",
    "MODEL_SHAPE_FIELDS", "PENALTY_APPLIED", "TENSORBOARD_DIR", "TENSORBOARD_MISSING", "MetricsLog",
    "Progress", "TensorBoardLog", "check_config_file", "check_metrics_file", "check_not_reset",
    "check_saved_config", "check_tensorboard_dir", "check_utf8_path", "config_record", "describe",
    "has_saved_state", "hold_workdir", "penalty_applied", "prepare_workdir", "summary_line", "write_config",
]


class MetricsLog:
    """Appends one JSON line per record to metrics.jsonl (only on process 0 when multi-host)."""

    def __init__(self, workdir: Path, *, resume_step: int, enabled: bool = True,
                 eval_due: Callable[[int], bool] | None = None):
        self.path = workdir / METRICS_FILE
        self.enabled = enabled
        self._file: TextIO | None = None
        if enabled:
            self.truncate_after(resume_step, eval_due)
            try:
                self._file = open(self.path, "a")
            except OSError as e:
                raise WriteFailed("the metrics log", self.path, e) from None

    def truncate_after(self, step: int, eval_due: Callable[[int], bool] | None = None) -> None:
        """Drop records newer than ``step`` (from a run that died after its last checkpoint), atomically.

        ``eval_due(step)``: whether this run's schedule evaluates at ``step``; when it does not, an
        eval record at ``step`` is dropped too. That is the final evaluation of a finished run now
        extended (more --steps/--epochs): the extended run's evaluations are at its own eval steps,
        so metrics.jsonl keeps one eval row per eval step of the run it describes.
        """
        if not self.path.exists():
            return
        stale_eval = step > 0 and eval_due is not None and not eval_due(step)
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step
                and not (stale_eval and r.get("step") == step and r.get("split") == "eval")]
        try:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        except OSError as e:
            raise WriteFailed("the metrics log", self.path, e) from None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            except OSError as e:
                self._abandon()
                raise WriteFailed("the metrics log", self.path, e) from None

    def sync(self) -> None:
        """fsync, so records up to a checkpoint survive a power loss together with it."""
        if self._file is not None:
            try:
                os.fsync(self._file.fileno())
            except OSError as e:
                self._abandon()
                raise WriteFailed("the metrics log", self.path, e) from None

    def _abandon(self) -> None:
        """Close after a failed write without retrying it: a torn last line is dropped on resume."""
        with contextlib.suppress(OSError):
            self._file.close()  # may fail again flushing what is left in the buffer
        self._file = None

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                self._file = None
                raise WriteFailed("the metrics log", self.path, e) from None
            self._file = None


class TensorBoardLog:
    """Scalars of every record as ``train/<key>`` and ``eval/<key>`` in WORKDIR/tensorboard.

    ``resume_step``: the step of the restored checkpoint; the events of an earlier process past
    it (written after that checkpoint, before a kill) are purged (tensorboardX's ``purge_step``,
    the first step to drop), as metrics.jsonl is cut back, so no step is shown twice.
    """

    def __init__(self, workdir: Path, resume_step: int = 0):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UsageError(TENSORBOARD_MISSING) from None
        try:
            # Its own file name (events.out.tfevents.<seconds>.<host>.<pid>.<step>): a resume within
            # the same second as the earlier process would otherwise reopen and overwrite its file.
            self.writer = SummaryWriter(logdir=str(workdir / TENSORBOARD_DIR),
                                        purge_step=resume_step + 1 if resume_step else None,
                                        filename_suffix=f".{os.getpid()}.{resume_step}")
        except OSError as e:
            raise WriteFailed("the TensorBoard events", workdir / TENSORBOARD_DIR, e) from None

    def write(self, record: dict[str, Any]) -> None:
        prefix = record.get("split", "train")
        for key, value in record.items():
            if key not in ("step", "epoch", "split") and isinstance(value, int | float) \
                    and not isinstance(value, bool):  # penalty_applied is a flag, not a scalar to plot
                self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self.writer.close()


def _format_eta(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


#: Key of train records of a run whose penalty is measured but not applied (``--penalty-weight 0``).
PENALTY_APPLIED = "penalty_applied"


def penalty_applied(record: dict[str, Any]) -> bool:
    """False for a record of a ``--penalty-weight 0`` run (its ``penalty`` is only a diagnostic)."""
    return record.get(PENALTY_APPLIED, True)


def describe(record: dict[str, Any]) -> str:
    """Short text of a train or eval record for logs (no penalty when it is not applied)."""
    if record.get("split") == "eval":
        attacked = "".join(f", {k.split('/', 1)[1]} {v:.4f}" for k, v in record.items()
                           if k.startswith("eval_accuracy/"))  # --eval-attacks: fgsm@0.05 ...
        return f"eval loss {record['eval_loss']:.4f} acc {record['eval_accuracy']:.4f}{attacked}"
    penalty = f" penalty {record['penalty']:.3e}" if penalty_applied(record) else ""
    return f"loss {record['loss']:.4f}{penalty} acc {record['accuracy']:.3f}"


class Progress:
    """A rich progress bar (steps/s, ETA) on a terminal; plain periodic lines otherwise or with --quiet."""

    def __init__(self, total: int, start: int, *, quiet: bool, enabled: bool = True,
                 stream: TextIO | None = None):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stdout
        self.interval = max(1, total // 20)
        self._t0: float | None = None
        self._step0 = start
        self._bar = None
        if enabled and not quiet and self.stream.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, rate="", info="")

    def rate(self, step: int) -> float:
        """Steps per second since the first step of this process (which includes compilation)."""
        if self._t0 is None or step <= self._step0:
            return math.nan
        return (step - self._step0) / (time.perf_counter() - self._t0)

    def update(self, step: int, epoch: int, record: dict[str, Any]) -> None:
        if self._t0 is None:  # measure speed from the end of the first (compiling) step
            self._t0, self._step0 = time.perf_counter(), step
        if not self.enabled:
            return
        rate = self.rate(step)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, rate=f"{rate:.1f} steps/s" if rate > 0 else "",
                             info=describe(record))
        elif step % self.interval == 0 or step == self.total:
            eta = _format_eta((self.total - step) / rate) if rate > 0 else ""
            speed = f" | {rate:.2f} steps/s, ETA {eta}" if rate > 0 else ""
            self.log(f"step {step}/{self.total} (epoch {epoch + 1}) {describe(record)}{speed}")

    def log(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(line, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def summary_line(framework: str, step: int, wall_s: float, train: dict[str, Any] | None,
                 evaluation: dict[str, Any] | None, workdir: Path, plots: Sequence[Path] = ()) -> str:
    """The final one-line summary of a run, naming its folder and the ``plots`` drawn in it."""
    parts = [f"done ({framework}): {step} steps in {wall_s:.1f}s"]
    if evaluation is not None:
        parts.append(f"test accuracy {evaluation['eval_accuracy']:.4f}, "
                     f"test loss {evaluation['eval_loss']:.4f}")
    if train is not None:
        penalty = f", penalty {train['penalty']:.3e}" if penalty_applied(train) else ""
        parts.append(f"last train loss {train['loss']:.4f}{penalty}")
    parts.append(f"run folder {workdir}")
    if plots:
        names = [p.name if p.parent == workdir else str(p) for p in map(Path, plots)]
        parts[-1] += f" (plots: {', '.join(names)})"
    return "; ".join(parts)
