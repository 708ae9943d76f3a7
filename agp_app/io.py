"""Small file helpers shared by both CLIs: atomic writes and JSON lines."""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Name of ``atomic_write``'s temporary files: ``.<name>.<random>.tmp`` next to the target.
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".", ".tmp"


@functools.cache
def new_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open(path, "w")`` gives a new file (0o644 under umask 022).

    The umask can only be read by setting it, so it is set to 0o077 and restored at once (a
    file another thread creates in between gets the stricter mode, never a looser one), and
    cached: read once per process.
    """
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Write ``path`` all-or-nothing: ``write(f)`` fills a temporary file in the same folder,
    which is flushed, fsynced and renamed over ``path`` (``os.replace`` is atomic on POSIX),
    so a crash leaves either the old file or the new one, never half of either. The file gets
    the mode a plain ``open`` would give it (``new_file_mode``), not ``mkstemp``'s private 0o600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMPORARY_PREFIX}{path.name}.",
                               suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            os.chmod(tmp, new_file_mode())  # before the rename: the file never shows another mode
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: Room a checkpoint needs beyond its arrays' bytes: metadata, manifests, file-system blocks.
CHECKPOINT_OVERHEAD = 1 << 20


def ensure_free_space(folder: str | os.PathLike, needed: int) -> None:
    """``OSError(ENOSPC)`` unless the file system of ``folder`` (or of its nearest existing parent)
    has ``needed`` bytes free: checked before a checkpoint, whose libraries fail noisily half-way."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {needed / 2**20:.1f} MiB needed, "
                                    f"{free / 2**20:.1f} MiB free")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that ``atomic_write`` left in ``folder`` when its process was killed.

    Only files named as ``atomic_write`` names them (``.<name>.<random>.tmp``) are
    touched; returns what was removed. The target files themselves are intact:
    the rename that would have replaced them never happened.
    """
    removed = []
    for p in Path(folder).glob(f"{TEMPORARY_PREFIX}*{TEMPORARY_SUFFIX}"):
        if p.is_file() and p.name.count(".") >= 3:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write`` for a string."""
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``atomic_write`` of ``obj`` as indented, key-sorted JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class JsonLinesError(ValueError):
    """A line of a JSON-lines file that is not a JSON object; ``line`` is its 1-based number."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str):
        self.path, self.line, self.reason = Path(path), line, reason
        super().__init__(f"{path} line {line}: {reason}")


#: Most bytes a run-folder file read back whole may hold (metrics.jsonl: about two million records).
MAX_RUN_FILE_BYTES = 1 << 30


def read_regular_file(path: str | os.PathLike, limit: int = MAX_RUN_FILE_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; ``OSError`` otherwise.

    Opened without blocking and checked with ``fstat`` before reading, so a FIFO (which would
    block the run forever) or a link to a device such as ``/dev/zero`` (which never ends) is
    refused at once, naming what it is.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or folder); expected a file "
                                        "written by a training run", str(path))
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than the {limit} bytes a run-folder file may hold", str(path))
    return data


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file; a last line cut short by a crash (no newline after it) is skipped.

    Any other line that is not UTF-8 JSON of an object raises ``JsonLinesError`` naming it; a file
    that is not a regular file, or too large (``read_regular_file``), raises ``OSError``.
    """
    lines = read_regular_file(path).split(b"\n")
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            if i == len(lines) - 1:  # torn final line (no newline yet): ignore it
                return
            reason = ("not UTF-8 text" if isinstance(e, UnicodeDecodeError) else
                      "JSON nested too deeply" if isinstance(e, RecursionError) else f"not JSON ({e.msg})")
            raise JsonLinesError(path, i + 1, reason) from None
        if not isinstance(record, dict):
            raise JsonLinesError(path, i + 1, f"a JSON {type(record).__name__}, not an object")
        yield record
