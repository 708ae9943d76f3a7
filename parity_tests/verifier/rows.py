"""The verifier's rows: one compared quantity each, its tolerance and verdict; the table and the verdict line.

Framework-free (NumPy only): the rows are built from ``parity_tests.harness.compare``'s
``Comparison`` objects, or are notes (``tolerance=None``) that state how the pair was run
(dropout off) or which settings of the twins differ (BatchNorm epsilon, momentum).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from parity_tests.harness import TOLERANCES, Comparison, Tolerance, compare

#: Conversions only move entries (transposes, the flatten permutation), so the round trip gives
#: back the very same bits.
EXACT = Tolerance(0.0, 0.0, "conversions are pure permutations of entries: bit-exact")


def displacement_tolerance(dtype: str, step: int, theta_scale: float, step_atol: float = 0.0) -> Tolerance:
    """Tolerance on the displacement ``theta_t - theta_0`` of one parameter tensor after ``step`` steps.

    The parameters themselves (dominated by their initial values, so a weak
    check) are compared with ``params_tolerance``; the displacement, exactly
    what the gradients produced, is the sharp check. Its error has three
    sources: the gradients' relative error (``rtol`` of ``TOLERANCES``), their
    absolute error where a gradient is zero up to rounding (``step_atol`` per
    step: ``lr`` times the gradient rows' ``atol``; BERT's attention key bias,
    whose exact gradient is 0, moves by ~1e-17 noise that agrees with nothing),
    and the rounding of the stored parameters, up to one ulp of ``|theta|``
    per step between the frameworks (``step * eps * max|theta|``). The last
    matters in float32: one step moves the parameters by ``lr |g|``, often only
    ~1e-3 of ``|theta|``, so an ulp of ``theta`` (1.2e-7 ``|theta|``) is ~1e-4 of
    the displacement (measured 7.9e-5 on the example LeNet, lr 0.01).
    """
    base = TOLERANCES[dtype]
    atol = step * (float(np.finfo(dtype).eps) * theta_scale + step_atol)
    reason = f"{base.reason}; plus {step} x (ulp of max|theta| + lr x gradient atol) = {atol:.1e}"
    return Tolerance(base.rtol, atol, reason)


def params_tolerance(dtype: str, step: int, step_atol: float = 0.0) -> Tolerance:
    """Tolerance on the parameters after ``step`` SGD steps: ``TOLERANCES`` plus ``step * step_atol``.

    ``step_atol`` (``lr`` times the gradient rows' ``atol``) is how far one
    step may move a tensor differently where its gradient is zero up to
    rounding; it matters for parameters that start at 0 (biases).
    """
    base = TOLERANCES[dtype]
    atol = step * step_atol
    return Tolerance(base.rtol, atol, f"{base.reason}; plus {step} x lr x gradient atol = {atol:.1e}")


def gradient_tolerance(dtype: str, gradient_scale: float) -> Tolerance:
    """Tolerance on each parameter tensor's gradient: ``TOLERANCES`` plus ``atol = rtol * max|grad|``.

    ``gradient_scale`` is the largest entry of the whole gradient (every
    tensor). Each tensor is measured against its own largest entry, and also
    against the whole gradient's: a tensor whose gradient is zero up to
    rounding holds noise that agrees with nothing (a conv bias in front of a
    train-mode BatchNorm, which subtracts the batch mean: its gradient is
    ~1e-17, measured relative error 0.97 between the frameworks). This is the
    normwise measure of ``parity_tests/harness.py`` applied to the gradient as
    one vector.
    """
    base = TOLERANCES[dtype]
    atol = base.rtol * gradient_scale
    return Tolerance(base.rtol, atol, f"{base.reason}; atol = rtol x the largest gradient entry, {atol:.1e}")


@dataclass(frozen=True)
class Row:
    """One verified quantity: the worst normwise relative error, the tolerance, the verdict.

    ``where`` names the worst tensor of an aggregated row (the SGD steps) or
    why a comparison could not be made (a shape or key mismatch). A note
    (``tolerance is None``, ``max_rel`` NaN) compares no numbers: it states
    how the pair was run, or fails when the twins' settings differ.
    """

    quantity: str
    max_rel: float
    tolerance: Tolerance | None
    passed: bool
    where: str = ""

    @classmethod
    def of(cls, comparison: Comparison) -> Row:
        return cls(comparison.quantity, comparison.max_rel, comparison.tolerance, comparison.passed)

    @classmethod
    def worst(cls, quantity: str, comparisons: Sequence[Comparison]) -> Row:
        """The failing (else any) comparison with the largest relative error; passes if every one does."""
        worst = max(comparisons, key=lambda c: (not c.passed, c.max_rel))
        where = " ".join(filter(None, ("worst:", worst.case, worst.quantity)))
        return cls(quantity, worst.max_rel, worst.tolerance, all(c.passed for c in comparisons), where)

    @classmethod
    def note(cls, quantity: str, where: str, passed: bool = True) -> Row:
        """A row without numbers: how the pair was run, or (failing) a setting the twins do not share."""
        return cls(quantity, math.nan, None, passed, where)

    @property
    def is_note(self) -> bool:
        return self.tolerance is None


def compare_row(quantity: str, dtype: str, actual, expected, tolerance: Tolerance | None = None,
                case: str = "") -> Row:
    """One row; a shape mismatch (a layout mistake) is a failing row, not an exception."""
    tolerance = tolerance or TOLERANCES[dtype]
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return Row(quantity, math.inf, tolerance, False,
                   f"shape {actual.shape} (Flax) != {expected.shape} (PyTorch)")
    return Row.of(compare(quantity, dtype, actual, expected, tolerance, case))


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table: quantity, max rel err, tolerance, pass/FAIL, where."""
    header = ("quantity", "max rel err", "tolerance", "result", "")
    lines = [(r.quantity, _format_error(r), _format_tolerance(r.tolerance), _result(r), r.where)
             for r in rows]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in [header, *lines])


def verdict(rows: Sequence[Row]) -> str:
    """One line: every row passes, or which ones do not, then each failing note's reason (the cause)."""
    failed = [r for r in rows if not r.passed]
    if not failed:
        return f"PASS: all {len(rows)} rows within tolerance"
    names = ", ".join(r.quantity for r in failed)
    line = f"FAIL: {len(failed)} of {len(rows)} rows out of tolerance: {names}"
    reasons = [f"{r.quantity}: {r.where}" for r in failed if r.is_note]
    return line + "".join(f"; {reason}" for reason in reasons)


def print_report(rows: Sequence[Row]) -> int:
    """Print the table and the verdict line; the exit status: 0 when every row passes, 1 when not."""
    print(format_table(rows))
    print(verdict(rows), flush=True)
    return 0 if all(r.passed for r in rows) else 1


def first_line(error: BaseException | Warning | str) -> str:
    """The first line of an exception's (or warning's) message, for one-line errors and notes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _result(row: Row) -> str:
    if row.is_note:
        return "note" if row.passed else "FAIL"
    return "pass" if row.passed else "FAIL"


def _format_error(row: Row) -> str:
    if row.is_note:
        return "-"
    return "0" if row.max_rel == 0 else f"{row.max_rel:.1e}"


def _format_tolerance(tolerance: Tolerance | None) -> str:
    if tolerance is None:
        return "-"
    return "exact" if tolerance.rtol == 0 and tolerance.atol == 0 else str(tolerance)
