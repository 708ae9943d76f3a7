"""What both CLIs leave behind and print: file modes, the summary line, runs without the penalty."""

import contextlib
import io
import json
import os
import stat
from pathlib import Path

import pytest

from agp_common.io import atomic_write_text, new_file_mode
from agp_common.runlog import describe, summary_line
from tests._cli_fixtures import one_torch_thread  # noqa: F401

PLOTS = ("loss.png", "grad_norms.png", "accuracy.png")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextlib.contextmanager
def umask(mask):
    """Run with ``mask`` as the process umask (and ``new_file_mode`` read again under it)."""
    old = os.umask(mask)
    new_file_mode.cache_clear()
    try:
        yield
    finally:
        os.umask(old)
        new_file_mode.cache_clear()


def modes(folder):
    """{path relative to ``folder``: permission bits} of everything below ``folder``."""
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_atomic_writes_get_the_mode_a_plain_open_gets(tmp_path):
    with umask(0o027):
        atomic_write_text(tmp_path / "atomic.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    assert modes(tmp_path) == {"atomic.txt": 0o640, "plain.txt": 0o640}


def cli(framework):
    if framework == "jax":
        import jax_impl.train as train
    else:
        import torch_ref.train as train
    return train.main


@pytest.fixture(scope="module", params=["jax", "torch"])
def run_without_penalty(request, tmp_path_factory):
    """A finished 3-step run with ``--penalty-weight 0`` under umask 022, then the same command again
    (which rewrites metrics.jsonl and the plots): (framework, workdir, printed lines of the first run)."""
    framework = request.param
    workdir = tmp_path_factory.mktemp(framework) / "run"  # created by the CLI, under umask 022
    argv = ["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--batch-size", "8", "--steps", "3",
            "--penalty-weight", "0", "--tensorboard", "--quiet", "--workdir", str(workdir)]
    out = io.StringIO()
    with umask(0o022), contextlib.redirect_stdout(out):
        assert cli(framework)(argv) == 0
        first = out.getvalue()
        assert cli(framework)(argv) == 0
    return framework, workdir, first.strip().splitlines()


def test_every_file_of_a_finished_run_is_readable_as_the_umask_allows(run_without_penalty):
    _, workdir, _ = run_without_penalty
    found = modes(workdir)
    expected_files = {"config.json", "metrics.jsonl", *PLOTS}
    assert expected_files <= set(found)
    assert any(name.startswith("checkpoints/") for name in found)
    assert any(name.startswith("tensorboard/") for name in found)
    wrong = {name: oct(mode) for name, mode in found.items()
             if mode != (0o755 if (workdir / name).is_dir() else 0o644)}
    assert wrong == {}  # umask 022: files rw-r--r--, folders rwxr-xr-x (checkpoints included)


def test_the_summary_names_the_run_folder_and_its_plots(run_without_penalty):
    framework, workdir, lines = run_without_penalty
    assert lines[-1].startswith(f"done ({framework}): 3 steps")
    assert lines[-1].endswith(f"run folder {workdir} (plots: loss.png, grad_norms.png, accuracy.png)")
    assert all((workdir / name).read_bytes()[:4] == b"\x89PNG" for name in PLOTS)


def test_without_the_penalty_nothing_prints_it_and_records_say_it_is_not_applied(run_without_penalty):
    _, workdir, lines = run_without_penalty
    assert any(line.startswith("step 3/3") and "loss" in line for line in lines)
    assert [line for line in lines if "penalty" in line] == []
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["penalty_applied"] for r in train] == [False] * 3
    assert all(r["penalty"] > 0 and r["total"] == r["loss"] for r in train)  # measured, not added
    assert all("penalty_applied" not in r for r in records if r["split"] == "eval")


def test_with_the_penalty_progress_and_summary_print_it():
    record = {"step": 1, "split": "train", "loss": 2.0, "penalty": 0.01, "accuracy": 0.5}
    workdir = Path("run")
    assert "penalty 1.000e-02" in describe(record)
    assert "penalty 1.000e-02" in summary_line("jax", 1, 1.0, record, None, workdir)
    unapplied = {**record, "penalty_applied": False}
    assert "penalty" not in describe(unapplied)
    assert "penalty" not in summary_line("jax", 1, 1.0, unapplied, None, workdir)
