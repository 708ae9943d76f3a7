"""Run-folder faults on both training CLIs (issue 10): resume on other data, unbounded labels,
damaged logs, a full disk, inputs that used to crash with a traceback, and the library's own checks.

Every failure a user can cause is one line naming the thing and the fix, exit 2 (exit 1 when it
happens during training), no traceback, and nothing already saved is changed. The CLIs run
in-process through their ``main(argv)``, on the tiny .npz data of tests/npz_runs.py (a run that
must succeed, such as the resume after a failure, parses the same flags and trains without the
plots: ``resume_without_plots``); the disk-full tests mount a small tmpfs (root only; skipped with
the reason otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_impl.train as jax_train
import torch_ref.train as torch_train
from agp_common import TrainConfig, UsageError, load_dataset, parse_config
from agp_common.data import MAX_CLASSES
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

MAINS = {"jax": jax_train.main, "torch": torch_train.main}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=list(MAINS))
def cli(request) -> str:
    return request.param


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


def run_main(cli: str, argv: list[str], capsys) -> tuple[int, str]:
    try:
        status = MAINS[cli](argv)
    except SystemExit as e:  # argparse: malformed flags
        status = e.code
    return status, capsys.readouterr().err


def resume_without_plots(cli: str, argv: list[str]) -> None:
    """Train as ``MAINS[cli](argv)`` does (the same flags, parsed the same way), without its plots.

    For the runs that must succeed, where a test reads the run folder's log at most: the CLI's plots
    cost ~1 s a run, and tests/test_run_folder.py checks them. A failure raises with its traceback.
    """
    module = jax_train if cli == "jax" else torch_train
    module.train_and_evaluate(parse_config(argv, prog="test", framework=cli), plots=False)


def fresh_args(data: Path, workdir: Path, **changes) -> list[str]:
    return cli_args(npz_config(data, **changes), workdir)


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


# 2. Unbounded labels -----------------------------------------------------------------------------

def labels_with(index: int, value, dtype=np.int64) -> np.ndarray:
    y = (np.arange(N_TRAIN) % 10).astype(dtype)
    y[index] = value
    return y


@pytest.mark.parametrize(("y", "flags", "message"), [
    (labels_with(5, 10**9), [], "labels must be in [0, 10000) to infer the number of classes"),
    (labels_with(7, 2**32, np.uint64), [], "(the first bad one: y[7] = 4294967296)"),
    (labels_with(3, 10), ["--num-classes", "10"],
     "labels must be in [0, 10), found values from 0 to 10 (the first bad one: y[3] = 10); fix the labels"),
], ids=["a label of 10^9", "a uint64 label of 2^32", "a label past --num-classes"])
def test_labels_out_of_bounds_are_refused_naming_label_and_index(cli, y, flags, message, tmp_path, capsys):
    data = write_npz(tmp_path / "labels.npz", **{**good_arrays(), "y": y})
    t0 = time.perf_counter()
    status, err = run_main(cli, [*fresh_args(data, tmp_path / "run"), *flags], capsys)
    assert_one_line_error(status, err, message)
    assert time.perf_counter() - t0 < 30  # was: 16 GB and 70 s, or an XLA abort
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["1", "10001"])
def test_num_classes_out_of_range_is_a_one_line_error(cli, value, template, tmp_path, capsys):
    data, _ = template
    status, err = run_main(cli, [*fresh_args(data, tmp_path / "run"), "--num-classes", value], capsys)
    assert_one_line_error(status, err, f"--num-classes must be between 2 and {MAX_CLASSES}, got {value}")
    assert not (tmp_path / "run").exists()


# JAX: slow, as it compiles a 12-class model (~7 s) for what is the same code in both CLIs: the flag,
# its record in config.json and the resume check are agp_common's; the model is built from
# ``Dataset.num_classes`` as for every other count.
@pytest.mark.parametrize("cli", [pytest.param("jax", marks=pytest.mark.slow), "torch"])
def test_num_classes_sets_the_model_output_and_is_recorded(cli, template, tmp_path, capsys):
    data, _ = template
    run = tmp_path / "run"
    status, err = run_main(cli, [*fresh_args(data, run, steps=1), "--num-classes", "12"], capsys)
    assert status == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["num_classes"] == 12 and saved["dataset"]["num_classes"] == 12
    # Another class count is another model: refused on resume, nothing written.
    before = snapshot(run)
    status, err = run_main(cli, [*fresh_args(data, run, steps=2), "--num-classes", "11"], capsys)
    assert_one_line_error(status, err, "num_classes: saved 12, now 11")
    assert snapshot(run) == before


def test_num_classes_is_documented_in_the_data_group():
    from agp_common.config import build_parser

    text = " ".join(build_parser("prog", "jax").format_help().split())
    data_group = text[text.index("data:"):text.index("model and penalty:")]
    assert "--num-classes K number of classes; every label must be in [0, K). Not set:" in data_group
    assert f"max(label) + 1 for npz (refused above {MAX_CLASSES})" in data_group


# 3. A damaged metrics.jsonl ----------------------------------------------------------------------

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


# 4. A full disk ----------------------------------------------------------------------------------

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


# 5. Inputs that used to crash with a traceback ---------------------------------------------------

def npy_file(tmp_path: Path) -> Path:
    np.save(tmp_path / "x.npy", np.zeros((4, 16, 16, 1), np.float32))
    return tmp_path / "x.npy"


def no_channels(tmp_path: Path) -> Path:
    return write_npz(tmp_path / "c0.npz", **{**good_arrays(), "x": np.zeros((N_TRAIN, 16, 16, 0), np.float32),
                                             "x_test": np.zeros((N_TEST, 16, 16, 0), np.float32)})


def huge_float64(tmp_path: Path) -> Path:
    arrays = good_arrays()
    arrays["x"] = arrays["x"].astype(np.float64)
    arrays["x"][3, 0, 0, 0] = 1e300  # finite in float64, Inf in float32
    return write_npz(tmp_path / "big.npz", **arrays)


@pytest.mark.parametrize(("make", "message"), [
    (npy_file, "a single .npy array, not an .npz archive"),
    (no_channels, "images have 0 channels"),
    (huge_float64, "pixel values up to 1e+300 overflow float32"),
], ids=["a .npy file", "0 channels", "float64 near 1e300"])
def test_data_that_used_to_crash_is_a_one_line_error_and_leaves_no_workdir(cli, make, message, tmp_path,
                                                                          capsys):
    status, err = run_main(cli, fresh_args(make(tmp_path), tmp_path / "run"), capsys)
    assert_one_line_error(status, err, message)
    assert not (tmp_path / "run").exists()


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


# 6. The Python API: the same checks on both sides ------------------------------------------------

def zero_params(model, image_shape):
    """Parameters of ``model`` for images of ``image_shape``, all 0: shapes without running ``init``
    (its op-by-op execution takes seconds; these tests check inputs, not values)."""
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))["params"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def jax_call(x, w):
    import jax.numpy as jnp

    from jax_impl import Net, penalized_loss

    model = Net(num_classes=10)
    params = zero_params(model, (16, 16, 1))
    return penalized_loss(params, model, jnp.asarray(x), jnp.zeros(len(x), jnp.int32), penalty_weight=w)


def torch_call(x, w):
    import torch

    import torch_ref

    model = torch_ref.Net(in_channels=1, num_classes=10, image_size=16)
    w = torch.as_tensor(w) if isinstance(w, np.ndarray) else w
    return torch_ref.penalized_loss(model, torch.as_tensor(x.transpose(0, 3, 1, 2).copy()),
                                    torch.zeros(len(x), dtype=torch.long), w)


GOOD_X = np.zeros((2, 16, 16, 1), np.float32)


@pytest.mark.parametrize("call", [jax_call, torch_call], ids=["jax", "torch"])
@pytest.mark.parametrize(("x", "weight", "message"), [
    (np.zeros((0, 16, 16, 1), np.float32), 1.0, "holds no examples"),
    (GOOD_X, float("nan"), "penalty_weight must be a finite number >= 0, got nan"),
    (GOOD_X, -1.0, "penalty_weight must be a finite number >= 0, got -1.0"),
    (GOOD_X, np.ones(3, np.float32), "penalty_weight must be one number (a scalar)"),
    (np.full((2, 16, 16, 1), np.nan, np.float32), 1.0, "contains NaN or Inf"),
], ids=["batch of 0", "NaN weight", "negative weight", "vector weight", "NaN input"])
def test_penalized_loss_refuses_the_same_inputs_in_both_frameworks(call, x, weight, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(x, weight)


def test_a_traced_penalty_weight_is_not_checked_under_jit():
    import jax
    import jax.numpy as jnp

    from jax_impl import Net, penalized_loss

    model = Net(num_classes=10)
    params = zero_params(model, (16, 16, 1))
    traces = []

    @jax.jit
    def loss(w):
        traces.append(w)
        x, y = jnp.asarray(GOOD_X), jnp.zeros(2, jnp.int32)
        return penalized_loss(params, model, x, y, penalty_weight=w)[0]

    assert np.isfinite(loss(2.0)) and np.isfinite(loss(3.0))  # a traced weight: no concrete check, no error
    assert len(traces) == 1  # compiled once: the checks cost nothing at run time


# Property: any .npz contents give a dataset or one line, quickly and in bounded memory ------------

DTYPES = ["float16", "float32", "float64", "int8", "uint8", "int64", "uint64", "bool", "complex64", "<U1"]
LABEL_VALUES = st.one_of(st.integers(0, 12), st.sampled_from([-1, 10_000, 10**9, 2**32, 2**62]))


@st.composite
def npz_contents(draw) -> dict[str, np.ndarray]:
    rank = draw(st.sampled_from([4, 4, 4, 1, 3, 5]))
    n = draw(st.integers(0, 6))
    side = st.sampled_from([0, 1, 8, 16, 17, 20])
    shape = (n, *[draw(side) for _ in range(rank - 1)]) if rank > 1 else (n,)
    if rank == 4:
        shape = (n, draw(side), draw(side), draw(st.integers(0, 3)))
    dtype = draw(st.sampled_from(DTYPES))
    special = draw(st.sampled_from([None, np.nan, np.inf, 1e300, -1e38]))
    x = np.ones(shape, np.float64) * draw(st.floats(0, 255))
    if special is not None and x.size:
        x.flat[0] = special
    with np.errstate(all="ignore"):
        x = x.astype(dtype)
    y_dtype = draw(st.sampled_from(["int64", "int8", "uint64", "float32", "bool"]))
    y_len = draw(st.sampled_from([n, n, max(n - 1, 0)]))
    values = draw(st.lists(LABEL_VALUES, min_size=y_len, max_size=y_len))
    with np.errstate(all="ignore"):
        y = np.asarray(values, np.int64).astype(y_dtype) if y_dtype != "uint64" else \
            np.asarray([v % 2**64 for v in values], np.uint64)
    arrays = {"x": x, "y": y}
    if draw(st.booleans()):
        arrays.update(x_test=x[:2], y_test=y[:2])
    return arrays


def check_dataset_or_one_line(path: Path, num_classes: int | None, dtype: str) -> None:
    config = TrainConfig(dataset="npz", data_dir=str(path), num_classes=num_classes, dtype=dtype)
    t0 = time.perf_counter()
    try:
        ds = load_dataset(config)
    except UsageError as e:
        assert "\n" not in str(e) and str(e)
    else:
        assert ds.x_train.ndim == 4 and ds.num_classes <= MAX_CLASSES
        for y in (ds.y_train, ds.y_test):
            assert 0 <= y.min() and y.max() < ds.num_classes
        with np.errstate(over="raise"):
            assert np.isfinite(ds.x_train.astype(dtype)).all() and np.isfinite(ds.x_test.astype(dtype)).all()
    assert time.perf_counter() - t0 < 5


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays=npz_contents(), num_classes=st.sampled_from([None, None, 2, 10]),
       dtype=st.sampled_from(["float32", "float64"]))
def test_any_npz_contents_give_a_dataset_or_one_line(arrays, num_classes, dtype, tmp_path):
    path = write_npz(tmp_path / "data.npz", **arrays)
    check_dataset_or_one_line(path, num_classes, dtype)


MEMORY_LIMIT = 4 << 30  # bytes of resident memory a CLI may use on this tiny data


@pytest.mark.slow  # real CLI processes (~10 s each); the in-process property test runs by default
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays=npz_contents())
@pytest.mark.parametrize("module", ["jax_impl.train", "torch_ref.train"])
def test_the_real_cli_process_exits_0_or_2_in_one_line_in_bounded_time_and_memory(module, arrays, tmp_path):
    path = write_npz(tmp_path / f"data{time.monotonic_ns()}.npz", **arrays)
    argv = [sys.executable, "-m", module, "--dataset", "npz", "--data-dir", str(path), "--steps", "1",
            "--batch-size", "1", "--quiet", "--workdir", str(tmp_path / f"run{time.monotonic_ns()}")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    returncode, stderr, max_rss = run_measured(argv, env, timeout=120)  # the time bound
    assert returncode in (0, 2), stderr
    if returncode == 2:
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert "Traceback" not in stderr
    assert max_rss < MEMORY_LIMIT


def run_measured(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, int]:
    """``(exit status, stderr, peak resident bytes)`` of one child, killed after ``timeout`` seconds.

    The peak is the child's own ``VmHWM`` (/proc/<pid>/status), read until it exits: its
    ``ru_maxrss`` would also count the pytest process it was forked from (Linux keeps the
    pre-exec high-water mark), and ``RUSAGE_CHILDREN`` every child the test process ever had.
    """
    peak = 0
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env, text=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = max(peak, int(status.split("VmHWM:")[1].split()[0]) * 1024)
            except (OSError, IndexError, ValueError):  # exited (a zombie has no VmHWM) or not yet exec'd
                pass
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"{argv} ran past {timeout} s")
            time.sleep(0.05)
        err.seek(0)
        return proc.returncode, err.read(), peak
