"""Compare two training runs' metrics step by step: the training-level twin of ``parity_tests.verify``.

    python -m parity_tests.compare_runs RUN_A RUN_B [--rtol X] [--ignore KEY,KEY]

``RUN_A`` and ``RUN_B`` are run folders (or their ``metrics.jsonl`` files): one JSON object per
logged step, ``{"step": int, "split": "train"|"eval", "epoch": ..., <metric>: number, ...}``
(``agp_app.runlog``). A metric is ``<split>/<key>`` (``train/loss``, ``eval/accuracy``); for each
metric both runs logged, over the steps both logged it at::

    abs(s) = |a_s - b_s|
    rel(s) = abs(s) / max(|a_s|, |b_s|)        (0 when both are 0)

and the report gives ``max_s abs(s)`` and ``max_s rel(s)`` with the step where each occurs. NaN
against NaN counts as equal, NaN against a number as ``inf``. Keys that are not numbers
(``penalty_applied``, strings) are not compared; the timing keys (``step_time_s``,
``examples_per_s``) are left out unless ``--ignore`` says otherwise. Steps that only one run logged
and metrics that only one run has are listed. Where a run logged a step twice, the later record wins.

Exit status: 0 (also when the runs differ), unless ``--rtol X`` is given: then 1 if any metric's
largest relative difference exceeds ``X``. 2, with one ``error:`` line, for a missing folder or
file, a metrics file that is not a regular file, larger than ``MAX_BYTES``, or not JSON lines of
objects with an integer ``step`` (a last line cut short by a crash is skipped, with a note).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
#: Largest metrics file read (a million logged steps take ~300 MB).
MAX_BYTES = 1 << 30
#: Keys of a record that identify it (or are bookkeeping: the epoch) rather than measure anything.
KEY_FIELDS = ("step", "split", "epoch")
#: Keys left out by default: wall-clock measurements, never equal across runs.
TIMING_KEYS = ("step_time_s", "examples_per_s")

Series = dict[str, dict[int, float]]  # metric -> step -> value


class RunError(Exception):
    """A run that cannot be read; the message is the ``error:`` line."""


@dataclass(frozen=True)
class MetricDiff:
    """One metric compared over the ``steps`` both runs logged it at."""

    metric: str
    steps: int
    max_abs: float
    abs_step: int
    max_rel: float
    rel_step: int


def metrics_path(run: str | os.PathLike) -> Path:
    """The metrics file of ``run`` (a run folder, or the file itself); ``RunError`` if absent."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        raise RunError(f"{path}: no such file (expected a run folder holding {METRICS_FILE}, or the file)")
    return path


def _read_text(path: Path, max_bytes: int) -> str:
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise RunError(f"{path}: not a regular file")
    with path.open("rb") as f:
        data = f.read(max_bytes + 1)  # bounded: a file that grows while read is refused, not swallowed
    if len(data) > max_bytes:
        raise RunError(f"{path}: larger than {max_bytes} bytes; not a metrics log this tool reads")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _parse_line(path: Path, n: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    step = record.get("step") if isinstance(record, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise RunError(f"{path}: line {n} is not a record with an integer step >= 0")
    return record


def read_metrics(path: Path, max_bytes: int = MAX_BYTES, note=None) -> list[dict]:
    """The records of a metrics file, in file order (blank lines skipped); ``RunError`` if unreadable.

    A last line without its newline that does not parse is a write cut short: skipped, and
    ``note(message)`` is called if given.
    """
    text = _read_text(path, max_bytes)
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(_parse_line(path, n, line))
        except RunError:
            if n == len(lines) and not text.endswith("\n"):
                if note is not None:
                    note(f"{path}: skipped line {n}, cut short (no newline, not JSON)")
                continue
            raise
    return records


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def series(records: Sequence[dict], ignore: Sequence[str] = TIMING_KEYS) -> Series:
    """``{"<split>/<key>": {step: value}}`` of the numeric keys of ``records``."""
    out: Series = {}
    for record in records:
        split = record.get("split", "train")
        for key, value in record.items():
            number = _number(value)
            if key in KEY_FIELDS or key in ignore or number is None:
                continue
            out.setdefault(f"{split}/{key}", {})[record["step"]] = number
    return out


def _differences(a: float, b: float) -> tuple[float, float]:
    """(abs, rel) of one pair (module docstring)."""
    if math.isnan(a) or math.isnan(b):
        return (0.0, 0.0) if math.isnan(a) and math.isnan(b) else (math.inf, math.inf)
    if a == b:  # also equal infinities, whose difference would be NaN
        return 0.0, 0.0
    diff = abs(a - b)
    return diff, diff / max(abs(a), abs(b))


def compare_metric(metric: str, a: dict[int, float], b: dict[int, float]) -> MetricDiff | None:
    """The largest differences of one metric over the steps both logged; None if they share none."""
    common = sorted(a.keys() & b.keys())
    if not common:
        return None
    pairs = [(s, *_differences(a[s], b[s])) for s in common]
    abs_step, max_abs, _ = max(pairs, key=lambda p: p[1])
    rel_step, _, max_rel = max(pairs, key=lambda p: p[2])
    return MetricDiff(metric, len(common), max_abs, abs_step, max_rel, rel_step)


def _steps_text(steps: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return f"{len(steps)} step{'s' * (len(steps) != 1)} ({shown}{', ...' if len(steps) > limit else ''})"


def report(a: Series, b: Series, names: tuple[str, str]) -> tuple[list[str], list[MetricDiff]]:
    """Lines of the report and the per-metric differences."""
    diffs = [d for m in sorted(a.keys() & b.keys()) if (d := compare_metric(m, a[m], b[m])) is not None]
    width = max([len("metric"), *(len(d.metric) for d in diffs)])
    lines = [f"A: {names[0]}", f"B: {names[1]}",
             f"{'metric':<{width}}  {'steps':>6}  {'max abs diff':>12}  {'at step':>8}  "
             f"{'max rel diff':>12}  {'at step':>8}"]
    for d in diffs:
        lines.append(f"{d.metric:<{width}}  {d.steps:>6}  {d.max_abs:>12.3e}  {d.abs_step:>8}  "
                     f"{d.max_rel:>12.3e}  {d.rel_step:>8}")
    for label, mine, other in (("A", a, b), ("B", b, a)):
        only = sorted(mine.keys() - other.keys())
        if only:
            lines.append(f"metrics only in {label}: {', '.join(only)}")
        for split in sorted({m.split("/", 1)[0] for m in mine}):
            steps_mine = set().union(*(s.keys() for m, s in mine.items() if m.startswith(split + "/")))
            steps_other = set().union(*(s.keys() for m, s in other.items() if m.startswith(split + "/")))
            extra = sorted(steps_mine - steps_other)
            if extra:
                lines.append(f"{split} steps only in {label}: {_steps_text(extra)}")
    return lines, diffs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity_tests.compare_runs",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("run_a", metavar="RUN_A", help="run folder (or its metrics.jsonl)")
    parser.add_argument("run_b", metavar="RUN_B", help="run folder (or its metrics.jsonl)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="exit 1 if any metric's largest relative difference exceeds this")
    parser.add_argument("--ignore", default=",".join(TIMING_KEYS),
                        help="comma-separated record keys not compared (default: %(default)s)")
    args = parser.parse_args(argv)
    ignore = tuple(k for k in args.ignore.split(",") if k)
    def note(message: str) -> None:
        print(f"note: {message}", file=sys.stderr)

    try:
        runs = [series(read_metrics(metrics_path(r), note=note), ignore) for r in (args.run_a, args.run_b)]
    except (RunError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines, diffs = report(runs[0], runs[1], (args.run_a, args.run_b))
    print("\n".join(lines))
    if args.rtol is None:
        return 0
    over = [d.metric for d in diffs if not d.max_rel <= args.rtol]
    print(f"rtol {args.rtol:g}: " + (f"exceeded by {', '.join(over)}" if over else "all metrics within"))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
