"""Small file helpers shared by both CLIs: atomic writes and JSON lines."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Name of ``atomic_write``'s temporary files: ``.<name>.<random>.tmp`` next to the target.
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".", ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Write ``path`` all-or-nothing: ``write(f)`` fills a temporary file in the same folder,
    which is flushed, fsynced and renamed over ``path`` (``os.replace`` is atomic on POSIX),
    so a crash leaves either the old file or the new one, never half of either.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMPORARY_PREFIX}{path.name}.",
                               suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file; a last line cut short by a crash is skipped."""
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn final line (no newline yet): ignore it
                return
            raise
