"""Bad input through the training CLI: one line saying what was expected, exit 2, nothing written is damaged.

Each case runs ``main`` on a workdir that already holds a good run (two
steps, a checkpoint per step) and checks that every byte of it is unchanged.
Cases the existing tests already prove via the CLI (negative
--penalty-weight, unknown --penalty-layers, --lr nan, an incomplete CIFAR-10
folder, another config on resume) live in tests/test_train.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jax_impl.train as train
from agp_common import epoch_permutation
from agp_common.data import CIFAR_BINARY_FILES
from tests.cli_runs import run_main
from tests.npz_runs import (
    N_TEST,
    N_TRAIN,
    assert_one_line_error,
    cli_args,
    good_arrays,
    npz_config,
    snapshot,
    write_npz,
)


def with_(**changes):
    return {**good_arrays(), **changes}


BAD_ARRAYS = {
    "rank 3 images": (with_(x=np.zeros((N_TRAIN, 16, 16), np.float32)),
                      "expected images of shape (N, H, W, C)"),
    "images too small": (with_(x=np.zeros((N_TRAIN, 8, 8, 1), np.float32)), "at least 16x16"),
    "text images": (with_(x=np.full((N_TRAIN, 16, 16, 1), "a")), "expected numeric images, got dtype <U1"),
    "float labels": (with_(y=np.zeros(N_TRAIN, np.float32)),
                     "expected integer class labels, got dtype float32"),
    "too few labels": (with_(y=np.zeros(N_TRAIN - 1, int)), f"{N_TRAIN} images but {N_TRAIN - 1} labels"),
    "negative labels": (with_(y=-np.ones(N_TRAIN, int)), "labels must be >= 0, found values from -1 to -1"),
    "NaN pixels": (with_(x=np.full((N_TRAIN, 16, 16, 1), np.nan, np.float32)), "NaN or Inf"),
    "Inf pixels": (with_(x=np.full((N_TRAIN, 16, 16, 1), np.inf, np.float32)), "NaN or Inf"),
    "empty dataset": (with_(x=np.zeros((0, 16, 16, 1), np.float32), y=np.zeros(0, int)),
                      "the dataset is empty"),
    "test images of another size": (with_(x_test=np.zeros((N_TEST, 20, 20, 1), np.float32)),
                                    "expected the same (H, W, C)"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_bad_npz_arrays_are_one_line_errors_and_damage_nothing(case, existing_run, tmp_path, capsys):
    arrays, message = BAD_ARRAYS[case]
    data = write_npz(tmp_path / "bad.npz", **arrays)
    before = snapshot(existing_run)
    status, err = run_main("jax", cli_args(npz_config(data), existing_run), capsys)
    assert_one_line_error(status, err, message)
    assert snapshot(existing_run) == before


def truncated_npz(tmp_path: Path) -> Path:
    good = write_npz(tmp_path / "good.npz", **good_arrays())
    path = tmp_path / "truncated.npz"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return path


def corrupt_npz(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def folder_without_npz(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no data here")
    return tmp_path / "empty"


BAD_FILES = {
    "missing file": (lambda tmp: tmp / "missing.npz", "no such file or folder"),
    "truncated npz": (truncated_npz, "not a readable .npz file"),
    "corrupt npz": (corrupt_npz, "not a readable .npz file"),
    "folder without an npz": (folder_without_npz, "expected exactly one .npz file in the folder, found []"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_missing_truncated_or_corrupt_data_files_are_one_line_errors(case, existing_run, tmp_path, capsys):
    make, message = BAD_FILES[case]
    before = snapshot(existing_run)
    status, err = run_main("jax", cli_args(npz_config(make(tmp_path)), existing_run), capsys)
    assert_one_line_error(status, err, message)
    assert snapshot(existing_run) == before


def test_cifar10_labels_out_of_range_are_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in CIFAR_BINARY_FILES:
        records = rng.integers(0, 256, (2, 3073), dtype=np.uint8)
        records[:, 0] = 10  # class 10 does not exist
        records.tofile(tmp_path / name)
    status, err = run_main("jax", ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--workdir",
                           str(tmp_path / "run")], capsys)
    assert_one_line_error(status, err, "labels must be in [0, 10), found values from 10 to 10")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "25"], "--batch-size 25 is larger than the 24 training examples"),
    (["--penalty-weight", "nan"], "--penalty-weight must be a finite number >= 0, got nan"),
    (["--penalty-weight", "inf"], "--penalty-weight must be a finite number >= 0, got inf"),
    (["--penalty-layers", "relu1,conv9"], "unknown --penalty-layers ['conv9']"),
])
def test_bad_flags_are_one_line_errors_and_damage_nothing(flags, message, template, existing_run, capsys):
    data, _ = template
    before = snapshot(existing_run)
    status, err = run_main("jax", [*cli_args(npz_config(data), existing_run), *flags], capsys)
    assert_one_line_error(status, err, message)
    assert snapshot(existing_run) == before


def test_epochs_with_steps_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--epochs", "1", "--steps", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --steps: not allowed with argument --epochs" in err[0]


def test_workdir_that_is_a_file_or_not_writable_is_a_one_line_error(template, tmp_path, capsys):
    data, _ = template
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    status, err = run_main("jax", cli_args(npz_config(data), afile), capsys)
    assert_one_line_error(status, err, "is a file; expected a folder")
    assert afile.read_text() == "keep me"
    status, err = run_main("jax", cli_args(npz_config(data), afile / "run"), capsys)  # no folder there
    assert_one_line_error(status, err, "is not writable")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        status, err = run_main("jax", cli_args(npz_config(data), locked / "run"), capsys)
        assert_one_line_error(status, err, "is not writable")


def test_debug_shows_the_traceback(template, tmp_path, capsys):
    data = write_npz(tmp_path / "bad.npz", **with_(y=np.zeros(N_TRAIN, np.float32)))
    status = train.main([*cli_args(npz_config(data), tmp_path / "run"), "--debug"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_the_real_cli_process_prints_one_line_and_exits_2(tmp_path):
    data = write_npz(tmp_path / "nan.npz", **with_(x=np.full((N_TRAIN, 16, 16, 1), np.nan, np.float32)))
    argv = [sys.executable, "-m", "jax_impl.train", *cli_args(npz_config(data), tmp_path / "r")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {data} (x, y): images contain NaN or Inf; expected finite values"]


def test_a_poisoned_batch_stops_training_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    """Finite data that overflows float32 inside the network: the loss becomes NaN at step 2."""
    arrays = good_arrays()
    poisoned = epoch_permutation(0, 0, N_TRAIN)[8]  # first example of step 2 (0-based batch 1)
    arrays["x"][poisoned] = np.finfo(np.float32).max
    data = write_npz(tmp_path / "poisoned.npz", **arrays)
    workdir = tmp_path / "run"
    status, err = run_main("jax", [*cli_args(npz_config(data, steps=3), workdir)], capsys)
    assert_one_line_error(status, err, "step 2: ", expected_status=1)
    assert "is nan" in err or "is inf" in err
    assert "the newest checkpoint (step 1) is intact" in err
    # The bad state is never saved, nor its metrics.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    steps = [line for line in lines if '"split": "train"' in line]
    assert len(steps) == 1
    # The checkpoint is good: the same command up to step 1 restores it and evaluates it.
    status, err = run_main("jax", [*cli_args(npz_config(data, steps=1), workdir)], capsys)
    assert status == 0, err
    # Removing the poison makes other data: resuming on it is refused (train it in a new --workdir).
    clean = write_npz(tmp_path / "poisoned.npz", **good_arrays())
    status, err = run_main("jax", [*cli_args(npz_config(clean, steps=3), workdir)], capsys)
    assert_one_line_error(status, err, "the run was trained on other data")


def test_a_workdir_in_use_by_another_run_is_refused(existing_run, template, capsys):
    from agp_common.runlog import hold_workdir

    data, _ = template
    before = snapshot(existing_run)
    with hold_workdir(existing_run):  # as a run still training there would
        status, err = run_main("jax", cli_args(npz_config(data, steps=3), existing_run), capsys)
    assert_one_line_error(status, err, "is in use by another training run")
    assert snapshot(existing_run) == before


def test_temporary_files_of_a_killed_write_are_removed_on_resume(existing_run, template, capsys):
    data, _ = template
    stale = [existing_run / ".metrics.jsonl.k1ll3d.tmp", existing_run / ".config.json.abc123.tmp"]
    for path in stale:
        path.write_text("half")
    status, err = run_main("jax", cli_args(npz_config(data, steps=3), existing_run), capsys)
    assert status == 0, err
    assert not any(p.exists() for p in stale)
