"""``python -m parity_tests.compare_runs``: two runs' metrics compared step by step (hand-written logs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity_tests.compare_runs import RunError, main, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def write_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def train(step, loss, **kw):
    return {"step": step, "epoch": 0, "split": "train", "loss": loss, "lr": 0.1, "step_time_s": step * 0.3,
            **kw}


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines() if "/" in line.split()[0]}


def test_reports_the_largest_differences_and_where_they_occur(tmp_path, capsys):
    a = write_run(tmp_path / "a", [train(1, 2.0), train(2, 1.5), train(3, 1.0),
                                   {"step": 3, "epoch": 0, "split": "eval", "accuracy": 0.5}])
    b = write_run(tmp_path / "b", [train(1, 2.0), train(2, 1.4), train(3, 1.02),
                                   {"step": 3, "epoch": 0, "split": "eval", "accuracy": 0.5}])
    code, out, _ = run_main(capsys, a, b)
    assert code == 0
    table = rows(out)
    # loss: |1.5 - 1.4| = 0.1 at step 2 (rel 0.1 / 1.5); rel at step 3: 0.02 / 1.02 = 0.0196 < 0.0667
    assert table["train/loss"][1:] == ["3", "1.000e-01", "2", "6.667e-02", "2"]
    assert table["eval/accuracy"][1:] == ["1", "0.000e+00", "3", "0.000e+00", "3"]
    assert table["train/lr"][2] == "0.000e+00" and "train/epoch" not in table  # epoch: bookkeeping
    assert "train/step_time_s" not in table  # timing: left out by default


def test_steps_and_metrics_only_in_one_run_are_listed(tmp_path, capsys):
    a = write_run(tmp_path / "a", [train(s, 1.0) for s in range(1, 6)])
    b = write_run(tmp_path / "b", [train(s, 1.0, penalty=0.5) for s in range(1, 4)])
    code, out, _ = run_main(capsys, a, b)
    assert code == 0
    assert "train steps only in A: 2 steps (4, 5)" in out
    assert "metrics only in B: train/penalty" in out
    assert rows(out)["train/loss"][1] == "3"  # compared over the 3 shared steps


def test_rtol_sets_the_exit_status(tmp_path, capsys):
    a = write_run(tmp_path / "a", [train(1, 1.0)])
    b = write_run(tmp_path / "b", [train(1, 1.0 + 1e-9)])
    assert run_main(capsys, a, b, "--rtol", "1e-8")[0] == 0
    code, out, _ = run_main(capsys, a, b, "--rtol", "1e-10")
    assert code == 1 and "exceeded by train/loss" in out


def test_nan_against_a_number_is_an_infinite_difference_and_against_nan_none(tmp_path, capsys):
    a = write_run(tmp_path / "a", [train(1, float("nan")), train(2, float("nan"))])
    b = write_run(tmp_path / "b", [train(1, float("nan")), train(2, 1.0)])
    code, out, _ = run_main(capsys, a, b, "--rtol", "1")
    assert code == 1 and rows(out)["train/loss"][2:5] == ["inf", "2", "inf"]


def test_booleans_and_strings_are_not_compared(tmp_path, capsys):
    a = write_run(tmp_path / "a", [train(1, 1.0, penalty_applied=False, note="x")])
    b = write_run(tmp_path / "b", [train(1, 1.0, penalty_applied=True, note="y")])
    _, out, _ = run_main(capsys, a, b)
    assert "penalty_applied" not in out and "note" not in out


def test_a_metrics_file_may_be_named_directly(tmp_path, capsys):
    a = write_run(tmp_path / "a", [train(1, 1.0)])
    assert run_main(capsys, a / "metrics.jsonl", a)[0] == 0


def test_a_last_line_cut_short_is_skipped_with_a_note(tmp_path, capsys):
    a = write_run(tmp_path / "a", [train(1, 1.0)])
    with (a / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')
    code, out, err = run_main(capsys, a, a)
    assert code == 0 and "note:" in err and "line 2, cut short" in err
    assert rows(out)["train/loss"][1] == "1"


@pytest.mark.parametrize(("content", "message"), [
    ('{"step": 1}\n{"step": 2, "lo\n', "line 2 is not valid JSON"),
    ('[1, 2]\n', "line 1 is not a record with an integer step"),
    ('{"step": "3"}\n', "line 1 is not a record with an integer step"),
    (b"\xff\xfe\n", "not UTF-8"),
])
def test_damaged_logs_give_one_error_line_and_exit_2(tmp_path, capsys, content, message):
    a = tmp_path / "a"
    a.mkdir()
    path = a / "metrics.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = run_main(capsys, a, a)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_and_non_regular_files_exit_2(tmp_path, capsys):
    code, _, err = run_main(capsys, tmp_path / "nope", tmp_path / "nope")
    assert code == 2 and "no such file" in err
    (tmp_path / "empty").mkdir()
    assert run_main(capsys, tmp_path / "empty", tmp_path / "empty")[0] == 2
    (tmp_path / "dirlog" / "metrics.jsonl").mkdir(parents=True)
    code, _, err = run_main(capsys, tmp_path / "dirlog", tmp_path / "dirlog")  # its metrics.jsonl: a folder
    assert code == 2 and "not a regular file" in err
    if hasattr(os, "mkfifo"):  # a FIFO would block a plain open(): refused before opening
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        code, _, err = run_main(capsys, fifo, fifo)
        assert code == 2 and "not a regular file" in err


def test_reading_is_bounded(tmp_path):
    a = write_run(tmp_path / "a", [train(s, 1.0) for s in range(1, 50)])
    with pytest.raises(RunError, match="larger than 100 bytes"):
        read_metrics(a / "metrics.jsonl", max_bytes=100)


def test_runs_as_a_module(tmp_path):
    a = write_run(tmp_path / "a", [train(1, 1.0)])
    done = subprocess.run([sys.executable, "-m", "parity_tests.compare_runs", str(a), str(a), "--rtol", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "train/loss" in done.stdout, done.stderr
