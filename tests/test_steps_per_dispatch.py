"""--steps-per-dispatch: N train steps per compiled call train the numbers of N single steps, stop at
every evaluation, checkpoint and signal on a completed step, resume, and exist only in the JAX CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jax_impl.train as train
from agp_app.jax_train.dispatch import (
    ACCELERATOR_STEPS_PER_DISPATCH,
    AUTO_STEPS_PER_DISPATCH,
    resolve_steps_per_dispatch,
)
from agp_app.loop import chunk_length
from agp_common import TrainConfig, UsageError, parse_config
from tests.compile_counter import CompileCounter

TIMING_KEYS = ("step_time_s", "examples_per_s")
N = 4
# 20 examples in batches of 8: 3 steps per epoch (the last one partial). Evaluations at 10 and 15 and
# checkpoints at 7 and 14, none a multiple of N: chunks of 4 at steps 1-4 (across an epoch end and a
# partial batch) and 11-14, single steps elsewhere. A cosine learning rate and the lazy penalty (every
# 3rd step): each step of a chunk gets its own rate and penalty. Float64, so that the comparison is tight.
# --init shared: weights drawn in NumPy (compiling the float64 init costs here and in the SIGTERM child).
CONFIG = TrainConfig(dataset="synthetic", synthetic_shape=(20, 16, 16, 1), batch_size=8, steps=15,
                     eval_every=10, checkpoint_every=7, keep_checkpoints=10, quiet=True, dtype="float64",
                     lr_schedule="cosine", penalty_every=3, init="shared")


def records(workdir: Path, split: str = "train") -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{1: (result, workdir), N: (result, workdir, chunk compilations)} of CONFIG."""
    out = {}
    for n in (1, N):
        workdir = tmp_path_factory.mktemp(f"n{n}") / "run"
        with CompileCounter() as counter:
            result = train.train_and_evaluate(dataclasses.replace(CONFIG, steps_per_dispatch=n), workdir,
                                              plots=False)
        out[n] = (result, workdir, counter.compilations("train_chunk"))
    return out


def test_chunk_lengths_are_n_or_one_and_never_cross_a_boundary():
    periods, total = (10, 7), 47
    for start in (0, 3, 7, 13):
        step0, lengths = start, []
        while step0 < total:
            n = chunk_length(step0, total, N, periods)
            due = [s for s in range(step0 + 1, step0 + n) if s == total or any(s % p == 0 for p in periods)]
            assert due == []  # no evaluation, checkpoint or end inside a chunk
            lengths.append(n)
            step0 += n
        assert step0 == total and set(lengths) <= {1, N} and N in lengths


def test_the_loop_stops_at_a_non_finite_step_inside_a_chunk_before_saving_it(tmp_path):
    from agp_app.batching import BatchOrder
    from agp_app.errors import NonFiniteError
    from agp_app.loop import run_loop

    config = TrainConfig(dataset="synthetic", batch_size=2, steps=8, checkpoint_every=8, eval_every=8,
                         quiet=True)
    losses = iter([1.0, 0.9, float("nan"), 0.5, 0.4, 0.3, 0.2, 0.1])
    chunks, saved = [], []

    def metrics():
        return {"loss": next(losses), "penalty": 0.0, "total": 0.0, "grad_norm": 1.0, "accuracy": 0.5}

    def steps(indices):
        chunks.append(len(indices))
        return [metrics() for _ in indices]

    with pytest.raises(NonFiniteError, match="step 3: loss is nan"):
        run_loop(config, tmp_path, BatchOrder(0, 64, 2), 0, 8, train_step=lambda indices: metrics(),
                 evaluate=lambda: {"eval_loss": 0.0, "eval_accuracy": 1.0}, save=saved.append,
                 train_steps=steps, steps_per_dispatch=N)
    assert chunks == [N] and saved == []  # the first chunk is fetched alone: stopped there
    assert [r["step"] for r in records(tmp_path)] == [1, 2]  # written: the steps before it


def test_auto_is_eight_on_every_backend_and_host_feeding_runs_single_steps():
    assert AUTO_STEPS_PER_DISPATCH == ACCELERATOR_STEPS_PER_DISPATCH == 8  # the former name still works
    for platform in ("cpu", "gpu", "tpu"):
        assert resolve_steps_per_dispatch("auto", platform, "device") == AUTO_STEPS_PER_DISPATCH
        assert resolve_steps_per_dispatch("auto", platform, "host") == 1  # batches prepared one by one
    assert resolve_steps_per_dispatch(6, "cpu", "device") == 6
    assert resolve_steps_per_dispatch(6, "gpu", "host") == 1


def test_host_fed_batches_fall_back_to_one_step_per_call_with_a_line_saying_so(capsys):
    from agp_app.data import load_dataset

    config = dataclasses.replace(CONFIG, dtype="float32", steps_per_dispatch=N, augment=("flip",))
    trainer = train.JaxTrainer()
    trainer.prepare(config, load_dataset(config))  # builds, compiles nothing
    assert trainer.feeder.mode == "host" and trainer.steps_per_dispatch == 1
    assert capsys.readouterr().out.strip() == (
        f"--steps-per-dispatch {N}: the batches are prepared on the host (--augment, several processes or "
        "data too large for the devices), one step per call")


def test_n_steps_per_dispatch_train_the_losses_and_parameters_of_single_steps(runs):
    one, one_dir, _ = runs[1]
    chunked, chunked_dir, chunk_compilations = runs[N]
    assert chunk_compilations == 1  # one length N program; the steps before boundaries run singly
    assert chunked.step == one.step == 15
    got, want = records(chunked_dir), records(one_dir)
    assert [r["step"] for r in got] == list(range(1, 16))
    assert [set(r) for r in got] == [set(r) for r in want]  # the same keys, every step logged
    assert [r["examples"] for r in got] == [r["examples"] for r in want]
    # Float64, the same operations, but in another program: the scan's fuses the batch gather into the
    # step and XLA may order a reduction's terms differently. Bitwise equal for this config today; with
    # a constant rate and the penalty on every step the parameters differed by up to 9e-14 relative,
    # elementwise (near-zero weights), after 15 steps: rtol 1e-12 leaves room for that and no more.
    assert [r.get("penalty_applied", True) for r in got] == [s % 3 == 1 for s in range(1, 16)]
    assert len({r["lr"] for r in got}) == 15  # the schedule reached every step
    for key in ("loss", "penalty", "total", "grad_norm", "param_norm", "accuracy", "lr"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-12, err_msg=key)
    for a, b in zip(jax.tree.leaves(chunked.params), jax.tree.leaves(one.params), strict=True):
        # atol: weights near 0 carry the same absolute rounding (1e-12 of the largest weight is ~1e-13)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert [r["step"] for r in records(chunked_dir, "eval")] == [10, 15]
    assert sorted(int(p.name) for p in (chunked_dir / "checkpoints").iterdir()) == [7, 14, 15]


def test_a_chunked_run_resumes_from_a_checkpoint_inside_its_chunk_pattern(runs, tmp_path):
    full, full_dir, _ = runs[N]
    # Killed after its step-7 checkpoint: resumed at 7, the next chunk starts off the first run's grid.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full_dir, interrupted)
    for step in ("14", "15"):
        shutil.rmtree(interrupted / "checkpoints" / step)
    resumed = train.train_and_evaluate(dataclasses.replace(CONFIG, steps_per_dispatch=N), interrupted,
                                       plots=False)
    assert resumed.step == 15
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)  # the same programs: bitwise
    assert [without_timing(r) for r in records(interrupted)] == [without_timing(r) for r in records(full_dir)]


def test_the_flag_is_not_part_of_the_run_so_a_resume_may_change_it(runs, tmp_path):
    full, full_dir, _ = runs[N]
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "15")
    resumed = train.train_and_evaluate(dataclasses.replace(CONFIG, steps_per_dispatch=1), resumed_dir,
                                       plots=False)
    assert resumed.step == 15  # accepted: only step 15 was left, trained alone either way
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
    assert (parse_config(["--steps-per-dispatch", "8"], "p", "jax").workdir
            == parse_config([], "p", "jax").workdir)  # the default run folder does not depend on it


def test_bad_values_are_refused_in_one_line():
    with pytest.raises(UsageError, match=r"--steps-per-dispatch must be 'auto' or an integer >= 1, got 0"):
        train.train_and_evaluate(dataclasses.replace(CONFIG, steps_per_dispatch=0), "unused", plots=False)


def test_the_torch_cli_refuses_the_flag_in_one_line(capsys):
    import torch_ref.train as torch_train

    with pytest.raises(SystemExit) as exit_:  # argparse's exit, as ``python -m torch_ref.train`` ends
        torch_train.main(["--steps-per-dispatch", "4"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m torch_ref.train: error: unrecognized arguments: --steps-per-dispatch 4; see --help"]


# The CLI's SIGTERM with CONFIG's run: the signal comes while the chunk of steps 1-4 is prepared (the
# driver pauses as the loop asks for step 2's batch); the chunk completes and its last step is saved.
# CONFIG's flags, so that the module's chunked run is the reference and the child's float64 programs are
# the ones this process compiled (the session's compilation cache).
SIGNAL_FLAGS = ["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--batch-size", "8",
                "--steps", "15", "--eval-every", "10", "--checkpoint-every", "7", "--keep-checkpoints", "10",
                "--quiet", "--dtype", "float64", "--lr-schedule", "cosine", "--penalty-every", "3",
                "--init", "shared", "--steps-per-dispatch", str(N)]
ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_inside_a_chunk_saves_its_last_step_and_the_restart_finishes_the_same_run(runs, tmp_path):
    full, full_dir, _ = runs[N]
    run = tmp_path / "run"
    config = parse_config([*SIGNAL_FLAGS, "--workdir", str(run)], "test", "jax")
    assert config == dataclasses.replace(CONFIG, steps_per_dispatch=N, workdir=str(run))  # the same run
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_driver.py"), "jax_impl.train",
                             "before_step:2", *SIGNAL_FLAGS, "--workdir", str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("PAUSED "):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("stopped: stopped by SIGTERM after step 4")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4"]  # the steps applied
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]
    resumed = train.train_and_evaluate(config, plots=False)
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
    assert [without_timing(r) for r in records(run)] == [without_timing(r) for r in records(full_dir)]
