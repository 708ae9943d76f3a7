"""Run-folder faults on both training CLIs (issue 10): resume on other data, damaged logs, a full disk,
flags that would damage a saved run.

Every failure a user can cause is one line naming the thing and the fix, exit 2 (exit 1 when it
happens during training), no traceback, and nothing already saved is changed. The CLIs run
in-process through their ``main(argv)`` (tests/cli_runs.py), on the tiny .npz data of
tests/npz_runs.py (a run that must succeed, such as the resume after a failure, parses the same
flags and trains without the plots: ``resume_without_plots``); the disk-full tests mount a small
tmpfs (root only; skipped with the reason otherwise). The faults of the data itself are in
tests/test_npz_data_faults.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import torch_ref.train as torch_train
from tests.cli_runs import fresh_args, resume_without_plots, run_main
from tests.npz_runs import N_TRAIN, assert_one_line_error, good_arrays, npz_config, snapshot, write_npz

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def torch_template(template, tmp_path_factory) -> tuple[Path, Path]:
    """(data file, workdir of the same finished 2-step run as ``template``, trained by PyTorch).

    Made as ``template`` is, without the plots (~1 s): no test reads a template's plots.
    """
    data, _ = template
    run = tmp_path_factory.mktemp("torch_template") / "run"
    torch_train.train_and_evaluate(npz_config(data), run, plots=False)
    return data, run


@pytest.fixture
def existing(cli, request, tmp_path) -> tuple[Path, Path]:
    """(data file, a fresh copy of ``cli``'s finished 2-step run, checkpoints at steps 1 and 2)."""
    data, run = request.getfixturevalue("template" if cli == "jax" else "torch_template")
    return data, Path(shutil.copytree(run, tmp_path / "run"))


# 1. Resume on other data -------------------------------------------------------------------------

def other_data(tmp_path: Path, kind: str) -> Path:
    arrays = good_arrays(seed=1)  # same shapes and labels, other pixels
    if kind == "more examples":
        rng = np.random.default_rng(2)
        arrays = {**good_arrays(), "x": rng.random((N_TRAIN + 8, 16, 16, 1), dtype=np.float32),
                  "y": np.arange(N_TRAIN + 8) % 10}
    return write_npz(tmp_path / "other.npz", **arrays)


@pytest.mark.parametrize("kind", ["same shapes", "more examples"])
def test_resuming_on_other_data_is_refused_and_writes_nothing(cli, existing, kind, tmp_path, capsys):
    _, run = existing
    before = snapshot(run)
    status, err = run_main(cli, fresh_args(other_data(tmp_path, kind), run, steps=4), capsys)
    assert_one_line_error(status, err, "the run was trained on other data (fingerprint sha256:")
    assert "resume with the same data or use another --workdir" in err
    assert snapshot(run) == before


def test_the_same_data_under_another_path_resumes(cli, existing, tmp_path):
    data, run = existing
    moved = Path(shutil.copy(data, tmp_path / "moved.npz"))
    resume_without_plots(cli, fresh_args(moved, run, steps=3))


# 2. A damaged metrics.jsonl ----------------------------------------------------------------------

def damage_line(run: Path, text: bytes) -> None:
    path = run / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = text + b"\n"
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize(("text", "message"), [
    (b'{"step": 1, "loss": 2.3', "metrics.jsonl line 2: not JSON"),
    (b"\xff\xfe\x00garbage", "metrics.jsonl line 2: not UTF-8 text"),
    (b"[1, 2, 3]", "metrics.jsonl line 2: a JSON list, not an object"),
    (b'{"step": "one", "split": "train"}', "metrics.jsonl: record 2 has step 'one'"),
], ids=["broken JSON", "not UTF-8", "a list", "a step that is not a number"])
def test_a_damaged_line_inside_the_metrics_log_is_refused_and_writes_nothing(cli, existing, text, message,
                                                                           capsys):
    data, run = existing
    damage_line(run, text)
    before = snapshot(run)
    status, err = run_main(cli, fresh_args(data, run, steps=3), capsys)
    assert_one_line_error(status, err, message)
    assert "repair or delete that line" in err
    assert snapshot(run) == before  # config.json included: it used to be rewritten before the crash


def test_a_torn_last_line_of_the_metrics_log_still_resumes(cli, existing):
    data, run = existing
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "spl')  # a run killed in the middle of a write
    resume_without_plots(cli, fresh_args(data, run, steps=3))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3


# 3. A full disk ----------------------------------------------------------------------------------

PAGE = 4096


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk (needs root, or CAP_SYS_ADMIN); unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up to ``leave`` free bytes with one file; returns it (delete it to free the space)."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def checkpoint_files(run: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(run / "checkpoints").items()}


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_run_resumes_when_freed(cli, existing,
                                                                                   small_disk, capsys):
    data, template_run = existing
    run = Path(shutil.copytree(template_run, small_disk / "run"))
    before = checkpoint_files(run)
    filler = fill(small_disk, leave=64 * PAGE)  # room for config.json and the log, not a checkpoint
    status, err = run_main(cli, fresh_args(data, run, steps=3), capsys)
    assert_one_line_error(status, err, "could not write checkpoint ", expected_status=1)
    assert "No space left on device" in err and str(run / "checkpoints") in err
    after = checkpoint_files(run)
    assert {k: v for k, v in after.items() if k in before} == before  # earlier checkpoints intact
    filler.unlink()
    resume_without_plots(cli, fresh_args(data, run, steps=3))


def test_a_full_disk_during_a_log_write_is_one_line_and_the_run_resumes_when_freed(cli, existing,
                                                                                  small_disk, capsys):
    data, template_run = existing
    run = Path(shutil.copytree(template_run, small_disk / "run"))
    before = checkpoint_files(run)
    filler = fill(small_disk, leave=2 * PAGE)  # config.json and the log's rewrite fit; its growth does not
    argv = [*fresh_args(data, run, steps=60), "--checkpoint-every", "1000", "--eval-every", "1000"]
    status, err = run_main(cli, argv, capsys)
    assert_one_line_error(status, err, f"could not write the metrics log {run / 'metrics.jsonl'} "
                                       "(No space left on device)", expected_status=1)
    assert checkpoint_files(run) == before
    filler.unlink()
    resume_without_plots(cli, argv)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 61))


# 4. Flags that would damage a saved run -----------------------------------------------------------

@pytest.mark.parametrize(("flags", "message"), [
    (["--penalty-every", "10000000000"], "--penalty-every must be a positive integer number of steps, at"),
    (["--seed", "100000000000000000000000"], "--seed must be at most 2147483647"),
    (["--steps", "10000000000"], "--steps must be at most 2147483647"),
    (["--epochs", "2000000000"], "more than the 2147483647 a run can count"),
    (["--dataset", "synthetic", "--synthetic-shape", "1000000000000,32,32,3"],
     "--synthetic-shape 1000000000000,32,32,3 needs about"),
], ids=["penalty-every", "seed", "steps", "epochs", "synthetic-shape"])
def test_huge_numbers_are_one_line_errors_and_damage_nothing(cli, existing, flags, message, capsys):
    data, run = existing
    before = snapshot(run)
    length = [] if "--steps" in flags or "--epochs" in flags else ["--steps", "3"]
    argv = ["--dataset", "npz", "--data-dir", str(data), "--batch-size", "8", "--quiet",
            "--workdir", str(run), *length, *flags]
    status, err = run_main(cli, argv, capsys)
    assert_one_line_error(status, err, message)
    assert snapshot(run) == before


def test_an_empty_workdir_is_refused_instead_of_writing_into_the_current_folder(cli, template, tmp_path,
                                                                               monkeypatch, capsys):
    data, _ = template
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    argv = ["--dataset", "npz", "--data-dir", str(data), "--steps", "1", "--batch-size", "8", "--quiet",
            "--workdir", ""]
    status, err = run_main(cli, argv, capsys)
    assert_one_line_error(status, err, "--workdir is empty")
    assert list(here.iterdir()) == []
