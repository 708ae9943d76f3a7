"""Data faults on both training CLIs (issue 10): unbounded labels, ``--num-classes``, files that used
to crash with a traceback, and any .npz contents.

Every such fault is one line naming the thing and the fix, exit 2, no traceback, and no workdir is
made. The CLIs run in-process through their ``main(argv)`` (tests/cli_runs.py) on the tiny .npz
data of tests/npz_runs.py; the property tests feed ``load_dataset`` (and, marked slow, the real
CLI processes) arbitrary .npz contents and bound the time and memory they take.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agp_common import TrainConfig, UsageError, load_dataset
from agp_common.data import MAX_CLASSES
from tests.cli_runs import fresh_args, run_main
from tests.npz_runs import N_TEST, N_TRAIN, assert_one_line_error, good_arrays, snapshot, write_npz

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# 1. Unbounded labels -----------------------------------------------------------------------------

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


# 2. Inputs that used to crash with a traceback ---------------------------------------------------

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


# 3. Property: any .npz contents give a dataset or one line, quickly and in bounded memory ------------

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
