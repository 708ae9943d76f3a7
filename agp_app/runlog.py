"""The run folder shared by both CLIs: config.json, metrics.jsonl, progress, TensorBoard, summary.

Layout of ``WORKDIR``::

    config.json      {"framework", "config": TrainConfig fields, "dataset": sizes and shapes}
    metrics.jsonl    one JSON object per logged step: {"step", "epoch", "split": "train"|"eval", ...}
    checkpoints/     written by the framework (orbax for JAX, torch.save for PyTorch)
    *.png            plots (``agp_common.plot``)
    tensorboard/     event files, with --tensorboard

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
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

try:
    import fcntl
except ImportError:  # not POSIX: no workdir lock
    fcntl = None

from agp_app.checkpoints import CHECKPOINT_DIR
from agp_app.config import TrainConfig, check_resumable
from agp_app.errors import UsageError, WriteFailed
from agp_app.io import (
    JsonLinesError,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    read_regular_file,
    remove_stale_temporaries,
)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
#: Most bytes config.json may hold (a run's is about 2 KB).
MAX_CONFIG_BYTES = 16 << 20


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """Create ``workdir`` if needed; ``UsageError`` if it is a file, cannot be written, or its path
    is not UTF-8.

    Writability is asked of the kernel (``os.access``, which also reports a read-only file
    system) rather than probed with a file: nothing but the folder itself is created before the
    run holds the folder's lock, so a run starting beside another never sees (or removes) a file
    of the other's. The path must encode as UTF-8: orbax and tensorstore take paths as UTF-8
    strings and would otherwise fail at the first checkpoint, after all the training before it.
    """
    path = Path(workdir)
    check_utf8_path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--workdir {path} is a file; expected a folder (new or from an earlier run)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--workdir {path} is not writable ({e.strerror or e}); expected a folder you can "
                         "write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(path) else "permission denied"
        raise UsageError(f"--workdir {path} is not writable ({reason}); expected a folder you can write to")
    return path


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_utf8_path(path: str | os.PathLike, flag: str = "--workdir") -> None:
    """``UsageError`` naming ``flag`` unless the absolute ``path`` encodes as UTF-8 (a name with bytes
    such as ``b'\\xff'`` decodes to lone surrogates, which orbax's checkpoint paths cannot hold)."""
    text = str(Path(path).absolute())
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise UsageError(f"{flag} {shown} is not a UTF-8 path, which the checkpoints need; use a folder "
                         "whose name (and parents' names) are UTF-8") from None


@contextlib.contextmanager
def hold_workdir(workdir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``workdir`` (``flock`` on the folder itself, no lock file) while training.

    A second run on the same workdir gets a ``UsageError`` instead of interleaving its checkpoints and
    metrics with the first. The kernel drops the lock when the process ends, even on SIGKILL, so a
    killed run never leaves a stale lock. Once held, temporary files of killed atomic writes are
    removed. Filesystems without ``flock`` (some network filesystems) run unlocked.
    """
    if not enabled:
        yield
        return
    fd = os.open(workdir, os.O_RDONLY)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"--workdir {workdir} is in use by another training run; wait for it to end "
                                 "or use another --workdir") from None
            except OSError:
                pass  # no flock support here: go on without the lock
        remove_stale_temporaries(workdir)
        yield
    finally:
        os.close(fd)


def config_record(config: TrainConfig, framework: str, dataset_info: dict[str, Any],
                  capture_points: Sequence[str] | None = None) -> dict[str, Any]:
    """What config.json (and every checkpoint) holds; ``capture_points``: the model's, which
    ``--penalty-layers all`` means (so that a resume may name them instead)."""
    record = {"framework": framework, "config": config.to_json(), "dataset": dataset_info}
    if capture_points is not None:
        record[CAPTURE_POINTS] = list(capture_points)
    return record


#: Key of the model's capture points in a config record.
CAPTURE_POINTS = "capture_points"
#: Fields of the dataset summary that fix the model's shape: a checkpoint only fits the same ones.
MODEL_SHAPE_FIELDS = ("image_shape", "num_classes")
#: The dataset summary's content hash (``Dataset.fingerprint``): a run resumes only on the same data.
FINGERPRINT = "fingerprint"
DATA_SIZE_FIELDS = ("train_examples", "test_examples")


def check_saved_config(saved: dict[str, Any], config: TrainConfig, framework: str, where: str,
                       dataset_info: dict[str, Any] | None = None) -> None:
    """Refuse to resume a run of another framework, another trajectory-defining config, or (with
    ``dataset_info``) data of another image shape or number of classes, i.e. another model shape.

    Configs that mean the same run resume (``check_resumable``): the layers in another order,
    ``--penalty-layers`` naming every capture point (saved in the record) or ``all``, unit layer
    weights or none, ``--num-classes`` equal to the data's or unset.
    """
    if not isinstance(saved, dict) or "config" not in saved:
        raise UsageError(f"{where}: not a config written by this project (no 'config' key)")
    if saved.get("framework") != framework:
        raise UsageError(f"{where}: the workdir holds a {saved.get('framework')!r} run; this is "
                         f"{framework!r}, use another --workdir")
    old = saved.get("dataset")
    classes = (old.get("num_classes") if isinstance(old, dict) else None,
               dataset_info.get("num_classes") if dataset_info is not None else None)
    points = saved.get(CAPTURE_POINTS)
    try:
        check_resumable(TrainConfig.from_json(saved["config"]), config,
                        points if isinstance(points, list) else None, classes)
    except (UsageError, TypeError, ValueError) as e:
        raise UsageError(f"{where}: {e}") from None
    if dataset_info is not None and isinstance(old, dict):
        diffs = [f"{k} {old.get(k)} then, {dataset_info.get(k)} now" for k in MODEL_SHAPE_FIELDS
                 if old.get(k) != dataset_info.get(k)]
        if diffs:
            raise UsageError(f"{where}: the run was trained on data of another shape ({'; '.join(diffs)}), "
                             "so its model has another shape; use another --workdir or the same data")
        then, now = old.get(FINGERPRINT), dataset_info.get(FINGERPRINT)
        if then is not None and then != now:  # records older than the fingerprint have none: not compared
            sizes = "".join(f", {k} {old.get(k)} then, {dataset_info.get(k)} now" for k in DATA_SIZE_FIELDS
                            if old.get(k) != dataset_info.get(k))
            raise UsageError(f"{where}: the run was trained on other data (fingerprint {then} then, {now} "
                             f"now{sizes}); resume with the same data or use another --workdir")


def check_metrics_file(workdir: Path) -> None:
    """Refuse to resume on a metrics.jsonl that cannot be read back whole (writes nothing).

    Every line must be a JSON object with an integer ``step`` >= 0; only a last line cut
    short by a crash is allowed (it is dropped on resume, as the records after the checkpoint are).
    """
    path = workdir / METRICS_FILE
    if not path.exists():
        return
    advice = ("the log is damaged: repair or delete that line (config.json and the checkpoints are not "
              "affected), or use another --workdir")
    try:
        for n, record in enumerate(read_jsonl(path), 1):
            step = record.get("step")
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise UsageError(f"{path}: record {n} has step {step!r}, expected an integer >= 0; {advice}")
    except JsonLinesError as e:
        raise UsageError(f"{e}; {advice}") from None
    except OSError as e:
        raise UsageError(f"{path}: unreadable ({e.strerror or e}); {advice}") from None


def check_not_reset(workdir: Path, first_checkpoint: int) -> None:
    """Refuse to start a run from step 0 over metrics.jsonl records past ``first_checkpoint``.

    Call it when no checkpoint was found. Records past the step of the run's first checkpoint
    mean that checkpoint was written and is gone (``checkpoints/`` removed or lost); starting
    again would cut the log back to step 0. A run killed before its first checkpoint has no such
    record and starts again as usual.
    """
    path = workdir / METRICS_FILE
    if not path.exists():
        return
    last = max((r.get("step", 0) for r in read_jsonl(path)), default=0)
    if last > first_checkpoint:
        raise UsageError(f"{workdir} holds metrics up to step {last} but no checkpoint (was checkpoints/ "
                         "removed?); starting from step 0 would overwrite them: move metrics.jsonl away to "
                         "train from scratch in this folder, or use another --workdir")


def check_config_file(workdir: Path, record: dict[str, Any]) -> str | None:
    """Refuse to resume unless an existing config.json describes the same run and metrics.jsonl
    can be read back (``check_metrics_file``), and (with ``--tensorboard`` in ``record``) unless
    WORKDIR/tensorboard can be a folder of event files (``check_tensorboard_dir``); writes nothing.

    A config.json of another run is accepted when that run saved no checkpoint
    (``has_saved_state``): the difference is returned (None when there is none) and the new
    run starts over from step 0."""
    check_metrics_file(workdir)
    if record.get("config", {}).get("tensorboard"):
        check_tensorboard_dir(workdir)
    path = workdir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(read_regular_file(path, MAX_CONFIG_BYTES).decode())
    except OSError as e:  # also a FIFO, a device or too large (read_regular_file)
        raise UsageError(f"{path}: unreadable ({e.strerror or e}); expected the JSON of an earlier "
                         "run") from None
    except RecursionError:
        raise UsageError(f"{path}: unreadable (JSON nested too deeply); expected the JSON of an earlier "
                         "run") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: unreadable ({e}); expected the JSON of an earlier run") from None
    try:
        check_saved_config(saved, TrainConfig.from_json(record["config"]), record["framework"], str(path),
                           record.get("dataset"))
    except UsageError as e:
        if has_saved_state(workdir):
            raise
        return str(e)  # nothing was saved under that config: this run starts over (write_config)
    return None


def has_saved_state(workdir: Path) -> bool:
    """Whether WORKDIR/checkpoints holds any file: a run that stopped before its first checkpoint
    (a NaN at step 2, a wrong flag found while tracing, a kill) saved no state, so a run with other
    flags may start over there instead of being refused until the user deletes config.json.
    ``check_not_reset`` still refuses a folder whose metrics show that checkpoints were removed."""
    folder = workdir / CHECKPOINT_DIR
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def write_config(workdir: Path, record: dict[str, Any]) -> None:
    """config.json (atomically), after checking that an existing one describes the same run, or one
    that saved no checkpoint (replaced, with a note on stderr)."""
    replaced = check_config_file(workdir, record)
    if replaced is not None:
        print(f"note: starting over: {workdir / CONFIG_FILE} described a run that saved no checkpoint "
              f"({replaced.split(': ', 1)[-1]})", file=sys.stderr, flush=True)
    try:
        atomic_write_json(workdir / CONFIG_FILE, record)
    except OSError as e:
        raise WriteFailed("the run's config", workdir / CONFIG_FILE, e) from None


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


TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_MISSING = ("--tensorboard needs tensorboardX: pip install "
                       "'activation-gradient-penalty[tensorboard]'")


def check_tensorboard_dir(workdir: Path) -> None:
    """``UsageError`` unless WORKDIR/tensorboard is a folder or absent, and tensorboardX is installed.

    Checked before anything is written: otherwise a file at that name fails the run only when its
    first event is written, after config.json.
    """
    path = workdir / TENSORBOARD_DIR
    if path.exists() and not path.is_dir():
        raise UsageError(f"--tensorboard: {path} is not a folder; move it away (the event files go in a "
                         "folder of that name) or run without --tensorboard")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--tensorboard: {path} is not writable; expected a folder you can write to")
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise UsageError(TENSORBOARD_MISSING) from None


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
