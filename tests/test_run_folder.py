"""What both CLIs leave behind and print: file modes, the summary line, runs without the penalty; the
run folder's files they refuse to read or reset (the shared trainer skeleton, ``agp_app.trainer``)."""

import contextlib
import fcntl
import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

import agp_app.trainer
from agp_common import TrainConfig, UsageError
from agp_common.io import atomic_write_text, new_file_mode
from agp_common.runlog import describe, summary_line

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


# Six torch steps with checkpoints at 3 and 6: the run folder code is the skeleton both frameworks share.
SIX_STEPS = TrainConfig(dataset="synthetic", synthetic_shape=(20, 16, 16, 1), batch_size=8, steps=6,
                        checkpoint_every=3, quiet=True)
SIX_STEPS_ARGV = ["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--batch-size", "8", "--steps",
                  "6", "--checkpoint-every", "3", "--quiet"]


@pytest.fixture(scope="module")
def six_step_run(tmp_path_factory):
    """A finished torch run of SIX_STEPS, without plots; copy it before changing it."""
    import torch_ref.train

    workdir = tmp_path_factory.mktemp("six") / "run"
    torch_ref.train.train_and_evaluate(SIX_STEPS, workdir, plots=False)
    return workdir


def test_a_run_whose_checkpoints_were_removed_is_refused_not_restarted_over_its_metrics(six_step_run,
                                                                                         tmp_path):
    import torch_ref.train

    run = tmp_path / "run"
    shutil.copytree(six_step_run, run)
    shutil.rmtree(run / "checkpoints")
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(UsageError, match=r"metrics up to step 6 but no checkpoint .*move metrics.jsonl"):
        torch_ref.train.train_and_evaluate(SIX_STEPS, run, plots=False)
    assert (run / "metrics.jsonl").read_bytes() == metrics


#: How to make a file that would hang a run reading it (a FIFO) or never end (a link to /dev/zero).
SPECIAL_FILES = {"fifo": os.mkfifo, "dev_zero": lambda path: os.symlink("/dev/zero", path)}


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl"])
@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_run_file_that_is_no_regular_file_is_refused_at_once_in_one_line(tmp_path, capsys, name, kind):
    run = tmp_path / "run"
    run.mkdir()
    SPECIAL_FILES[kind](run / name)
    assert cli("torch")([*SIX_STEPS_ARGV, "--workdir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / name}: unreadable (not a regular file")
    assert len(err.strip().splitlines()) == 1


def test_deeply_nested_json_in_config_json_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's recursion limit
    assert cli("torch")([*SIX_STEPS_ARGV, "--workdir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'config.json'}: unreadable (JSON nested too deeply)")
    assert len(err.strip().splitlines()) == 1


def test_the_plots_are_drawn_while_the_run_still_holds_its_folder(six_step_run, tmp_path, monkeypatch):
    import torch_ref.train

    run = tmp_path / "run"
    shutil.copytree(six_step_run, run)
    locked = []

    def plot_checking_the_lock(workdir):
        fd = os.open(workdir, os.O_RDONLY)  # another open file: flock conflicts with the run's lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked.append(False)
        except BlockingIOError:
            locked.append(True)
        finally:
            os.close(fd)
        return []

    monkeypatch.setattr(agp_app.trainer, "plot_run", plot_checking_the_lock)
    torch_ref.train.train_and_evaluate(SIX_STEPS, run)  # at its end already: evaluates and plots
    assert locked == [True]


@pytest.mark.parametrize("same_run", [
    {"penalty_layers": ("relu2", "relu1")},  # another order
    {"penalty_layers": ("relu1", "relu2")},  # every capture point, named
    {"num_classes": 10},  # the data's number of classes, given
    {"penalty_layer_weights": (("relu1", 1.0), ("relu2", 1.0))},  # unit weights, given
])
def test_a_config_that_means_the_same_run_resumes_it(six_step_run, tmp_path, same_run):
    import torch_ref.train

    run = tmp_path / "run"
    shutil.copytree(six_step_run, run)
    config = TrainConfig(**{**SIX_STEPS.__dict__, **same_run})
    result = torch_ref.train.train_and_evaluate(config, run, plots=False)  # at its end: evaluates only
    assert result.step == 6


def test_a_config_that_means_another_run_is_still_refused(six_step_run, tmp_path):
    import torch_ref.train

    run = tmp_path / "run"
    shutil.copytree(six_step_run, run)
    config = TrainConfig(**{**SIX_STEPS.__dict__, "penalty_layers": ("relu1",)})
    with pytest.raises(UsageError, match=r"penalty_layers: saved None, now \('relu1',\)"):
        torch_ref.train.train_and_evaluate(config, run, plots=False)


def test_plain_steps_of_a_lazy_penalty_are_marked_and_print_no_penalty(tmp_path, capsys):
    import torch_ref.train

    workdir = tmp_path / "run"
    assert torch_ref.train.main([*SIX_STEPS_ARGV, "--steps", "4", "--penalty-every", "2", "--workdir",
                                 str(workdir)]) == 0
    train = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    # steps 1 and 3 (updates 0 and 2) carry the penalty; 2 and 4 compute none (their penalty is 0)
    assert [r.get("penalty_applied", True) for r in train] == [True, False, True, False]
    assert all(r["penalty"] > 0 for r in train[::2]) and all(r["penalty"] == 0 for r in train[1::2])
    assert "penalty" not in describe(train[1]) and "penalty" in describe(train[0])


def test_several_runs_are_overlaid_in_one_set_of_plots(six_step_run, tmp_path, capsys):
    from agp_app.plot import main as plot_main

    other = tmp_path / "other"
    shutil.copytree(six_step_run, other)
    out = tmp_path / "plots"
    out.mkdir()
    assert plot_main([str(six_step_run), str(other), "--out", str(out)]) == 0
    names = ("compare_loss.png", "compare_accuracy.png", "compare_grad_norms.png")
    assert capsys.readouterr().out.split() == [str(out / name) for name in names]
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in names)
    assert plot_main([str(six_step_run), str(other), "--out", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
