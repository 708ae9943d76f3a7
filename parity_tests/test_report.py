"""``python -m parity_tests.report``: the table it prints and its exit status."""

from __future__ import annotations

import pytest

from parity_tests import report
from parity_tests.harness import TOLERANCES, compare


def test_table_keeps_the_worst_error_of_each_quantity_and_flags_failures():
    tol = TOLERANCES["float64"]
    rows = {}
    report.add(rows, "{quantity}", [compare("loss", "float64", 1.0 + 1e-14, 1.0, tol, "a"),
                                    compare("loss", "float64", 1.0 + 1e-12, 1.0, tol, "b"),
                                    compare("logits", "float64", [2.0], [1.0], tol, "a")])
    table = report.format_table(rows).splitlines()
    assert table[0] == "| quantity | dtype | n | max abs err | max rel err | tolerance | result |"
    assert table[2] == "| loss | float64 | 2 | 1.0e-12 | 1.0e-12 | rtol=1e-10 | pass |"
    assert table[3] == "| logits | float64 | 1 | 1.0e+00 | 1.0e+00 | rtol=1e-10 | **FAIL** |"


def test_quick_report_prints_the_table_and_exits_zero(capsys):
    assert report.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| param_grad[conv1.kernel] | float32 |" in out
    assert "| trajectory params, 2 SGD steps | float64 |" in out
    assert "**FAIL**" not in out


def test_report_exits_non_zero_when_a_comparison_fails(monkeypatch, capsys):
    failing = compare("loss", "float64", 2.0, 1.0)
    monkeypatch.setattr(report, "collect", lambda **_: ({("loss", "float64"): [failing]}, []))
    assert report.main([]) == 1
    assert "FAIL" in capsys.readouterr().err


def test_bad_learning_rate_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--trajectory-lr", "-1"])
    assert exit_info.value.code == 2
    assert "--trajectory-lr must be in (0, 10], got -1.0" in capsys.readouterr().err
