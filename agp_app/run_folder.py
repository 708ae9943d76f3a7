"""The run folder shared by both CLIs: its layout, the checks before a run writes in it, its lock.

Layout of ``WORKDIR``::

    config.json      {"framework", "config": TrainConfig fields, "dataset": sizes and shapes}
    metrics.jsonl    one JSON object per logged step: {"step", "epoch", "split": "train"|"eval", ...}
    checkpoints/     written by the framework (orbax for JAX, torch.save for PyTorch)
    *.png            plots (``agp_common.plot``)
    tensorboard/     event files, with --tensorboard

Before a run writes anything there, ``prepare_workdir`` makes the folder, ``hold_workdir`` takes its
lock, and ``check_config_file`` / ``write_config`` refuse a folder that holds another run (another
framework, trajectory-defining config or data) or a log that cannot be read back. The logs written
into it (metrics.jsonl, TensorBoard, the progress line) are ``agp_app.runlog``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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
