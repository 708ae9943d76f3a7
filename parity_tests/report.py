"""``python -m parity_tests.report``: run the parity comparisons and print one table.

Cross-framework (JAX and PyTorch). The comparisons are the ones the tests
assert on (``parity_tests.comparisons``); this module only runs them and
tabulates the worst error of each quantity over every case, step or layer it
was measured in::

    | quantity | dtype | n | max abs err | max rel err | tolerance | result |

``max rel err`` is normwise: ``max|jax - torch| / max|torch|`` per tensor
(``harness.compare``). The exit status is 1 if any comparison fails, else 0.

Options: ``--quick`` (a small subset, for smoke tests), ``--per-case`` (one
row per comparison instead of per quantity), ``--trajectory-lr``. JAX runs in
full float32 (``harness.full_float32``: no TF32 on GPUs).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
import torch

from parity_tests import comparisons as cmp
from parity_tests.harness import Comparison, full_float32, single_threaded_torch

Rows = dict[tuple[str, str], list[Comparison]]


def quantity_group(quantity: str) -> str:
    """``"trajectory params[conv1.kernel]"`` -> ``"trajectory params"``; plain names unchanged."""
    return quantity.split("[", 1)[0] if quantity.startswith(("trajectory", "question")) else quantity


def add(rows: Rows, label: str, comparisons: Sequence[Comparison]) -> None:
    for c in comparisons:
        rows.setdefault((label.format(quantity=c.quantity, group=quantity_group(c.quantity)), c.dtype),
                        []).append(c)


def collect(quick: bool = False, trajectory_lr: float = cmp.TRAJECTORY_LR) -> tuple[Rows, list[str]]:
    """Run every comparison; return the rows (label, dtype) -> comparisons, and notes to print."""
    rows: Rows = {}
    notes: list[str] = []
    cases = cmp.default_cases()
    if quick:
        cases = [c for c in cases if c.batch == 1 and c.penalty_weight == 10.0]
    for case in cases:
        add(rows, "{quantity}", cmp.compare_case(case))
    notes.append(f"grid: {len(cases)} cases (parity_tests.comparisons.default_cases)")

    steps = 2 if quick else cmp.TRAJECTORY_STEPS
    for dtype in ("float64", "float32"):
        result = cmp.trajectory_comparisons(dtype, steps=steps, lr=trajectory_lr)
        add(rows, f"{{group}}, {steps} SGD steps", result.params + result.displacement)
        notes.append(f"trajectory {dtype}: lr={trajectory_lr}, batch {cmp.TRAJECTORY_BATCH}, penalty weight "
                     f"10; parameters moved {result.relative_move:.1e} of their largest entry")
        for step, margin in result.kink_steps:
            notes.append(f"trajectory {dtype}: step {step} left out, a pre-activation {margin:.1e} (relative)"
                         f" from a ReLU/max-pool kink took another float32 branch; JAX resynced to PyTorch")

    for kind in cmp.TIE_KINDS[:1] if quick else cmp.TIE_KINDS:
        net, x, _ = cmp.tie_setup(kind, "float64")
        tied = cmp.count_tied_windows(net, x)
        notes.append(f"max-pool ties ({kind}): tied windows {tied} (batch {len(x)})")
        for dtype in ("float64", "float32"):
            add(rows, f"max-pool ties ({kind}), all quantities", cmp.maxpool_tie_comparisons(kind, dtype))

    for batch, init_batch in cmp.SEED_ANSWER_BATCHES[:1] if quick else cmp.SEED_ANSWER_BATCHES:
        add(rows, "seed answer's loop body: total, param grads",
            cmp.seed_answer_comparisons(batch, init_batch))

    add(rows, "{group}", cmp.question_vs_answer_comparisons())
    return rows, notes


def format_table(rows: Rows) -> str:
    """A Markdown table, one row per (quantity, dtype): worst errors, the tolerance, pass/FAIL."""
    lines = ["| quantity | dtype | n | max abs err | max rel err | tolerance | result |",
             "|---|---|---:|---:|---:|---|---|"]
    for (label, dtype), comps in rows.items():
        tolerances = sorted({str(c.tolerance) for c in comps})
        verdict = "pass" if all(c.passed for c in comps) else "**FAIL**"
        lines.append(f"| {label} | {dtype} | {len(comps)} | {max(c.max_abs for c in comps):.1e} | "
                     f"{max(c.max_rel for c in comps):.1e} | {', '.join(tolerances)} | {verdict} |")
    return "\n".join(lines)


def per_case_rows(rows: Rows) -> Rows:
    return {(f"{c.case}: {c.quantity}", c.dtype): [c] for comps in rows.values() for c in comps}


#: Largest ``--trajectory-lr``: the trajectory compares SGD steps, which above this leave float32's range.
MAX_TRAJECTORY_LR = 10.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m parity_tests.report", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset (batch 1, 2 steps, ...)")
    parser.add_argument("--per-case", action="store_true", help="one row per comparison")
    parser.add_argument("--trajectory-lr", type=float, default=cmp.TRAJECTORY_LR,
                        help=f"SGD learning rate of the trajectory (default {cmp.TRAJECTORY_LR})")
    args = parser.parse_args(argv)
    if not 0 < args.trajectory_lr <= MAX_TRAJECTORY_LR:  # also NaN and inf
        parser.exit(2, f"{parser.prog}: error: --trajectory-lr must be in (0, {MAX_TRAJECTORY_LR:g}], got "
                       f"{args.trajectory_lr} (larger steps leave float32 and compare nothing; "
                       f"default {cmp.TRAJECTORY_LR})\n")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table and notes; return 1 if anything failed, else 0."""
    args = parse_args(argv)
    start = time.perf_counter()
    with single_threaded_torch(), full_float32():
        rows, notes = collect(quick=args.quick, trajectory_lr=args.trajectory_lr)
    print(format_table(per_case_rows(rows) if args.per_case else rows))
    print()
    for note in notes:
        print(f"- {note}")
    failed = [c for comps in rows.values() for c in comps if not c.passed]
    total = sum(len(c) for c in rows.values())
    print(f"- {total} comparisons, {len(failed)} failed, {time.perf_counter() - start:.0f} s; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
          f"numpy {np.__version__}, {platform.machine()}")
    for c in failed:
        print(f"FAIL {c}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
