"""Faults a hostile user can cause in the CLIs (issue 23): one ``error:`` line and exit 2 before
anything is written, signals outside the training loop reported as one line with ``128 + signum``,
and a run folder whose logs stay one row per step across kills, resumes and extensions.

The training CLIs run in-process through their ``main(argv)`` (tests/cli_runs.py) on the tiny
.npz data of tests/npz_runs.py; the cases that stop before training cost no compilation. The one
SIGTERM case runs in a child process (a regression would otherwise end the test process itself).
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from agp_app import runlog
from agp_app.sweep.cli import main as sweep_main
from agp_app.sweep.cli import parse_sweep
from agp_app.sweep.grid import run_label
from tests.cli_runs import TRAINS, records, run_main
from tests.npz_runs import assert_one_line_error, cli_args, good_arrays, npz_config, write_npz

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_npz(tmp_path_factory.mktemp("data") / "data.npz", **good_arrays())


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- refused before anything is written ---------------------------------------------------------------


def huge_header_npz(path: Path) -> Path:
    """An .npz of a few hundred bytes whose 'x' header claims (100000, 1000, 1000, 3) float32 (1.1 TiB)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (100000, 1000, 1000, 3)})
    labels = io.BytesIO()
    np.save(labels, np.zeros(100000, np.int64))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header.getvalue())
        z.writestr("y.npy", labels.getvalue())
    return path


def test_npz_whose_header_claims_more_than_the_memory_is_refused_before_loading(cli, tmp_path, capsys):
    data = huge_header_npz(tmp_path / "huge.npz")
    status, err = run_main(cli, cli_args(npz_config(data), tmp_path / "run"), capsys)
    assert_one_line_error(status, err, "headers declare")
    assert "GiB" in err and str(data) in err
    assert not (tmp_path / "run").exists()


def test_tensorboard_path_that_is_a_file_is_refused_before_config_json(cli, data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").write_text("not a folder")
    status, err = run_main(cli, [*cli_args(npz_config(data), run), "--tensorboard"], capsys)
    assert_one_line_error(status, err, "tensorboard is not a folder")
    assert entries(run) == ["tensorboard"]  # no config.json, metrics or checkpoints


def test_workdir_that_is_not_utf8_is_refused_up_front(cli, data, tmp_path, capsys):
    run = Path(os.fsdecode(bytes(tmp_path) + b"/run_\xff"))
    status, err = run_main(cli, cli_args(npz_config(data), run), capsys)
    assert_one_line_error(status, err, "not a UTF-8 path")
    assert "\\xff" in err
    assert entries(tmp_path) == []


@pytest.mark.parametrize("flags", [["--penalty-approx", "finite_difference", "--penalty-fd-step", "1e-30"],
                                   ["--penalty-layers", "input", "--penalty-approx", "finite_difference",
                                    "--penalty-fd-step", "1e-30"]])
def test_finite_difference_step_lost_in_rounding_is_a_usage_error(cli, flags, data, tmp_path, capsys):
    """JAX raised the library's ValueError while tracing (a traceback); PyTorch trained with penalty 0."""
    status, err = run_main(cli, [*cli_args(npz_config(data), tmp_path / "run"), *flags], capsys)
    assert_one_line_error(status, err, "--penalty-fd-step 1e-30")
    assert "float32" in err
    assert not (tmp_path / "run").exists()


def test_workdir_check_writes_no_file_into_the_folder(tmp_path):
    """Before the lock is held nothing but the folder itself may appear in it (no write probe),
    so a run starting beside another never sees or removes a file of the other's."""
    run = tmp_path / "run"
    run.mkdir()
    opened: list[str] = []

    def audit(event, args):
        if event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
            mode, flags = args[1], args[2]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writes and os.fsdecode(args[0]).startswith(str(run)):
                opened.append(os.fsdecode(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed: this one only records while ``opened`` is fresh
    assert runlog.prepare_workdir(run) == run
    found, opened[:] = list(opened), ["done"]
    assert found == [] and entries(run) == []


# --- the sweep and the parity report --------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["1,1", "0,3,3.0", "0,0"])
def test_sweep_repeated_weights_are_one_line_errors(weights, capsys):
    with pytest.raises(SystemExit) as e:
        parse_sweep(["--weights", weights])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "expected distinct numbers" in err and "Traceback" not in err


def test_sweep_labels_differ_for_weights_that_differ():
    """``:g`` printed 1 and 1.0000001 alike, so the second run resumed the first's folder and aborted."""
    weights = [1.0, 1.0000001, 0.1, 3.0, 1e-7, 2.5e-8 + 1e-20]
    labels = [run_label(("input",), "per_example", w, 0) for w in weights]
    assert len(set(labels)) == len(weights)
    shown = [float(label.split("_w")[1].split("_s")[0]) for label in labels]
    assert shown == weights  # exact: the label names the weight
    assert [run_label(("relu1",), "per_example", w, 2) for w in (1.0, 0.1)] == [  # usual names unchanged
        "relu1_per_example_w1_s2", "relu1_per_example_w0.1_s2"]


@pytest.mark.parametrize("dataset", ["npz", "cifar10"])
def test_sweep_dataset_without_data_dir_is_one_line_error(dataset, tmp_path, capsys):
    status = sweep_main(["--dataset", dataset, "--out", str(tmp_path / "out")])
    assert_one_line_error(status, capsys.readouterr().err, "needs --data-dir")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["under a file", "not UTF-8"])
def test_sweep_out_that_cannot_be_a_folder_is_refused_before_the_first_run(case, tmp_path, capsys):
    """It failed as the first run's ``--workdir`` (a flag the sweep does not have), or after every run."""
    (tmp_path / "file").write_text("")
    under_file = case == "under a file"
    out = tmp_path / "file" / "out" if under_file else Path(os.fsdecode(bytes(tmp_path) + b"/\xff"))
    status = sweep_main(["--weights", "1", "--seeds", "0", "--out", str(out)])
    assert_one_line_error(status, capsys.readouterr().err, f"--out {out}" if under_file else "--out ")
    assert entries(tmp_path) == ["file"]


@pytest.mark.parametrize("lr", ["1e308", "inf", "nan", "0", "-1"])
def test_report_trajectory_lr_out_of_range_is_one_line_exit_2(lr, capsys):
    from parity_tests.report import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--trajectory-lr", lr])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--trajectory-lr must be in" in err


# --- signals outside the training loop ------------------------------------------------------------------


def signal_during_plots(monkeypatch, signum: int) -> None:
    """The final plots receive ``signum`` half-way (as from ``kill`` or Ctrl-C)."""
    import agp_app.trainer

    def plot_run(workdir):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal should have stopped the plots")

    monkeypatch.setattr(agp_app.trainer, "plot_run", plot_run)


def test_ctrl_c_during_the_final_plots_is_one_line_and_exit_130(cli, data, tmp_path, capsys, monkeypatch):
    signal_during_plots(monkeypatch, signal.SIGINT)
    run = tmp_path / "run"
    try:
        status, err = run_main(cli, cli_args(npz_config(data), run), capsys)
    except KeyboardInterrupt:  # caught here, or pytest would end the session
        pytest.fail("Ctrl-C during the plots escaped as KeyboardInterrupt (a traceback)")
    assert status == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped: by SIGINT"), err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
    monkeypatch.undo()
    # What was saved is whole: the same command (without plots) finds the finished run.
    result = TRAINS[cli](npz_config(data), run, plots=False)
    assert result.step == 2
    evals = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "eval"]
    assert evals == [2]


def test_sigterm_during_the_final_plots_is_one_line_and_exit_143(data, tmp_path):
    """In a child process: before the fix SIGTERM ended it silently (143, no message)."""
    run = tmp_path / "run"
    code = textwrap.dedent(f"""
        import os, signal, sys
        import agp_app.trainer
        import torch_ref.train
        agp_app.trainer.plot_run = lambda workdir: (os.kill(os.getpid(), signal.SIGTERM), 1 / 0)
        sys.exit(torch_ref.train.main({cli_args(npz_config(data), run)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 143, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped: by SIGTERM"), proc.stderr
    assert (run / "config.json").is_file() and (run / "metrics.jsonl").is_file()


# --- logs across resumes --------------------------------------------------------------------------------


def test_extending_a_finished_run_keeps_one_eval_row_per_eval_step(cli, data, tmp_path):
    """--steps 3 evaluates at 2 and 3 (the end); extended to --steps 5 the run evaluates at 2, 4, 5:
    the old final row at 3 is not an eval step of the extended run and must go."""
    run = tmp_path / "run"
    TRAINS[cli](npz_config(data, steps=3), run, plots=False)
    assert [r["step"] for r in records(run) if r["split"] == "eval"] == [2, 3]
    TRAINS[cli](npz_config(data, steps=5), run, plots=False)
    rows = records(run)
    assert [r["step"] for r in rows if r["split"] == "eval"] == [2, 4, 5]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5]


def read_events(path: Path):
    """The ``Event`` protos of a TensorBoard events file (TFRecord framing: length, CRC, data, CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    raw, events, at = path.read_bytes(), [], 0
    while at < len(raw):
        (length,) = struct.unpack("<Q", raw[at:at + 8])
        event = Event()
        event.ParseFromString(raw[at + 12:at + 12 + length])
        events.append(event)
        at += 12 + length + 4
    return events


def visible_scalars(folder: Path) -> list[tuple[str, int]]:
    """(tag, step) of every scalar TensorBoard shows: files in order, a session START at step s
    hiding the earlier files' events at steps >= s (TensorBoard's purge of restarted runs)."""
    shown: list[tuple[str, int]] = []
    files = [read_events(path) for path in folder.glob("events.out.tfevents.*")]
    for events in sorted(files, key=lambda events: events[0].wall_time):  # in the order they were written
        for event in events:
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                shown = [(tag, step) for tag, step in shown if step < event.step]
            for value in event.summary.value:
                shown.append((value.tag, event.step))
    return shown


def test_tensorboard_events_are_cut_back_to_the_restored_checkpoint(cli, data, tmp_path):
    """A run killed after step 4 with its checkpoint at step 2 resumes at 2: the events of steps 3-4
    written before the kill are purged, so every (tag, step) shows once."""
    pytest.importorskip("tensorboardX")
    run = tmp_path / "run"
    config = npz_config(data, steps=4, checkpoint_every=2, tensorboard=True)
    TRAINS[cli](config, run, plots=False)
    # The state a kill between the checkpoint at 2 and the one at 4 leaves: that newest one is not there.
    newest = run / "checkpoints" / ("4" if cli == "jax" else "step_00000004.pt")
    assert newest.exists(), sorted(p.name for p in (run / "checkpoints").iterdir())
    if newest.is_dir():
        import shutil

        shutil.rmtree(newest)
    else:
        newest.unlink()
    result = TRAINS[cli](config, run, plots=False)
    assert result.step == 4
    shown = visible_scalars(run / "tensorboard")
    assert len(shown) == len(set(shown)), sorted(t for t in shown if shown.count(t) > 1)
    assert {step for tag, step in shown if tag == "train/loss"} == {1, 2, 3, 4}


@pytest.mark.parametrize("record", [{"step": 1, "split": "train", "loss": "abc"},
                                    {"step": "1", "split": "train", "loss": 1.0},
                                    {"step": 1, "split": "train", "loss": 1.0, "act_grad_norm/relu1": [1]}])
def test_plot_of_a_log_with_a_value_that_is_not_a_number_is_one_line(record, tmp_path, capsys):
    """The plot drew a string loss as a category (or dropped the figure) and exited 0."""
    from agp_app.plot import main as plot_main

    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    status = plot_main([str(tmp_path)])
    assert_one_line_error(status, capsys.readouterr().err, "expected a number")
    assert entries(tmp_path) == ["metrics.jsonl"]


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_data_file_that_is_not_a_regular_file_is_named_so(kind, tmp_path):
    """It was reported as "no such file or folder" although it is there."""
    from agp_app.data import load_npz
    from agp_common import UsageError

    path = tmp_path / "data.npz"
    os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")
    with pytest.raises(UsageError, match="not a regular file"):
        load_npz(path)


def test_a_run_that_saved_no_checkpoint_does_not_block_the_fix_it_advises(cli, data, tmp_path, capsys):
    """A NaN at step 1 says "try a smaller --lr"; the smaller --lr was then refused as another config
    because config.json was written and nothing else (no checkpoint) was."""
    run = tmp_path / "run"
    diverging = ["--lr", "1e30", "--penalty-weight", "1e30"]
    status, err = run_main(cli, [*cli_args(npz_config(data), run), *diverging], capsys)
    assert status == 1 and "try a smaller --lr" in err, err
    assert (run / "config.json").is_file()
    result = TRAINS[cli](npz_config(data, lr=0.01), run, plots=False)
    assert result.step == 2
    assert "starting over" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["config"]["lr"] == 0.01
    assert [r["step"] for r in records(run) if r["split"] == "train"] == [1, 2]


# JAX builds and traces ResNet-18 (~20-35 s on a loaded 2-core machine): slow; PyTorch's case (~7 s) proves
# the same path through the shared reporter (``PenaltyOptionsError`` in ``REPORTED_ERRORS``).
@pytest.mark.parametrize("cli", [pytest.param("jax", marks=pytest.mark.slow), "torch"])
def test_penalty_options_found_wrong_while_tracing_are_one_line(cli, data, tmp_path, capsys):
    """Finite differences per example over BatchNorm's interacting examples: the library's check runs
    when the step is traced, after config.json is written; it was a ValueError traceback."""
    flags = ["--model", "resnet18", "--penalty-layers", "input", "--penalty-approx", "finite_difference",
             "--penalty-normalization", "per_example", "--steps", "1", "--batch-size", "2"]
    status, err = run_main(cli, [*cli_args(npz_config(data), tmp_path / "run"), *flags], capsys)
    assert_one_line_error(status, err, "needs independent examples")


@pytest.mark.parametrize("module", ["jax_impl.train", "torch_ref.train"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_cli_imports_its_framework_is_one_line(module, signum, tmp_path):
    # 0.5 s after start the CLI is importing JAX or PyTorch (1.5-2 s on a quiet 2-core machine):
    # the entry point's handlers are installed within ~0.1 s, before those imports.
    workdir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", module, "--dataset", "synthetic", "--workdir",
                                str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and err.strip().splitlines() == [err.strip()]
    assert err.startswith(f"stopped: by {signal.Signals(signum).name}")
    assert not workdir.exists()
