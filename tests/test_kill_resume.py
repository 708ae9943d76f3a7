"""Kills and resume: real training runs as subprocesses, killed at chosen points, restarted on one workdir.

A run is SIGKILLed between checkpoint writes and in the middle of one, stopped
with SIGTERM and with Ctrl-C (SIGINT), and restarted each time with the same
command; it must end with parameters bitwise identical to an uninterrupted
run, a metrics.jsonl without duplicated or missing steps, and no half-written
checkpoint. The kill points are made deterministic from outside the program:
an interrupted child runs the trainer's ``main`` through ``tests/kill_driver.py``,
which wraps the metrics write, orbax's finalize or the checkpoint file write in
that process, prints ``PAUSED <where>`` there and waits until it is signalled.

The JAX children share a persistent compilation cache (only the first one
compiles), which keeps these tests at a few seconds per process. In the JAX
tests the uninterrupted reference (and, in the default one, the final restart)
is trained in the test process as the CLI's ``main`` trains (without the
plots), where its steps are already compiled: the interrupted runs, whose exit
status and signals are the point, are processes of their own. The default suite
runs a SIGKILL in a checkpoint write and a SIGTERM; ``-m slow`` adds a SIGKILL
between checkpoints, Ctrl-C, SIGKILLs at random moments and the PyTorch trainer.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cli_runs import records

TIMING_KEYS = ("step_time_s", "examples_per_s")
# 20 examples in batches of 8 (3 steps per epoch, the last one partial), 8 steps, a checkpoint every 2.
FLAGS = ["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--batch-size", "8", "--steps", "8",
         "--eval-every", "3", "--checkpoint-every", "2", "--keep-checkpoints", "10", "--quiet"]
WAIT_S = 300  # generous: the first JAX child compiles, and other tests may share the 2 cores
ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("kill_driver.py")


@pytest.fixture(scope="module")
def child_env(tmp_path_factory):
    env = dict(os.environ)
    # The test session's persistent compilation cache when it has one (then the first child may also
    # reuse what this process compiled), else one of this module's own.
    if not env.get("JAX_COMPILATION_CACHE_DIR"):
        env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    env.update({"JAX_PLATFORMS": "cpu",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    return env


def start(module: str, workdir: Path, env: dict, pause: str | None = None) -> subprocess.Popen:
    """``python -m <module> FLAGS``, or with ``pause`` the same ``main`` run by ``kill_driver.py``."""
    launch = ["-m", module] if pause is None else [str(DRIVER), module, pause]
    return subprocess.Popen([sys.executable, *launch, *FLAGS, "--workdir", str(workdir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_pause(proc: subprocess.Popen) -> str:
    """Read the child's stderr until it reports the pause; returns that line."""
    deadline = time.monotonic() + WAIT_S
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("PAUSED "):
            return line.strip()
    proc.kill()
    proc.communicate()
    raise AssertionError(f"child did not reach its pause point; stderr: {''.join(seen)[-3000:]}")


def interrupt(module: str, workdir: Path, env: dict, pause: str, sig: int) -> tuple[int, str]:
    """Run until ``pause``, send ``sig``, wait; returns (exit status, rest of stderr)."""
    proc = start(module, workdir, env, pause)
    assert wait_for_pause(proc) == f"PAUSED {pause}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=WAIT_S)
    return proc.returncode, err


def finish(module: str, workdir: Path, env: dict) -> str:
    proc = start(module, workdir, env)
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err[-3000:]
    return out


def assert_metrics_are_those_of_the_uninterrupted_run(workdir: Path, reference: Path) -> None:
    got = records(workdir)
    assert [r["step"] for r in got if r["split"] == "train"] == list(range(1, 9))  # none twice, none missing
    assert [r["step"] for r in got if r["split"] == "eval"] == [3, 6, 8]

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]

    assert strip(got) == strip(records(reference))


def assert_no_temporary_files(workdir: Path) -> None:
    leftovers = [p for p in workdir.rglob("*") if "tmp" in p.name]
    assert leftovers == []


def jax_final_state(workdir: Path):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
        assert manager.latest_step() == 8
        restored = manager.restore(8, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    import jax

    return jax.tree.leaves(restored["state"])


def train_jax_in_process(workdir: Path) -> None:
    """FLAGS trained in ``workdir`` in this process as the CLI's ``main`` trains them (resuming what is
    there), without the plots: the uninterrupted reference, and the final restart of an interrupted run
    (the command a child runs, without its start-up; a child's restart runs ``main`` itself)."""
    import jax_impl.train
    from agp_common import parse_config

    config = parse_config([*FLAGS, "--workdir", str(workdir)], prog="test", framework="jax")
    with contextlib.redirect_stdout(io.StringIO()):
        jax_impl.train.train_and_evaluate(config, plots=False)


def assert_jax_run_is_the_uninterrupted_one(run: Path, reference: Path) -> None:
    for got, want in zip(jax_final_state(run), jax_final_state(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert_metrics_are_those_of_the_uninterrupted_run(run, reference)
    assert_no_temporary_files(run)


def test_jax_run_survives_sigkill_during_a_checkpoint_and_sigterm(tmp_path, child_env):
    module = "jax_impl.train"
    reference, run = tmp_path / "reference", tmp_path / "run"
    train_jax_in_process(reference)  # first: what it compiles is in the cache before a child looks for it

    # SIGKILL in the middle of writing checkpoint 4: orbax's temporary folder is left behind, and
    # metrics.jsonl holds the records of steps 3 and 4, past the newest checkpoint (2) ...
    status, _ = interrupt(module, run, child_env, "in_save:4", signal.SIGKILL)
    assert status == -signal.SIGKILL
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[0] == "2" and names[1].startswith("4.orbax-checkpoint-tmp") and len(names) == 2
    assert [(r["step"], r["split"]) for r in records(run)][-3:] == [(3, "train"), (3, "eval"), (4, "train")]

    # ... and the restart removes it, drops those records, redoes steps 3-4, and stops cleanly on SIGTERM
    # during step 5, saving step 5 although it is not a checkpoint step. (Its train record is written only
    # when the metrics are fetched, here at step 6: the signal comes as step 5 starts.)
    status, err = interrupt(module, run, child_env, "before_step:5", signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("stopped: stopped by SIGTERM after step 5")
    assert "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "5"]

    train_jax_in_process(run)
    assert_jax_run_is_the_uninterrupted_one(run, reference)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [2, 4, 5, 6, 8]


# Slow: two more process starts (~10 s) for the same restart code as the test above (which also finds
# records past its newest checkpoint) and the same GracefulStop as its SIGTERM, reached by another signal.
@pytest.mark.slow
def test_jax_run_survives_sigkill_between_checkpoints_and_ctrl_c(tmp_path, child_env):
    module = "jax_impl.train"
    reference, run = tmp_path / "reference", tmp_path / "run"
    train_jax_in_process(reference)

    # SIGKILL after step 3's metrics (eval last) are written, between the checkpoints of steps 2 and 4:
    # metrics.jsonl holds records past the newest checkpoint, which the restart must drop.
    status, _ = interrupt(module, run, child_env, "record:eval:3", signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]
    assert [(r["step"], r["split"]) for r in records(run)][-2:] == [(3, "train"), (3, "eval")]

    # Ctrl-C (SIGINT) before step 6's checkpoint is written: step 6 is saved, exit 130.
    status, err = interrupt(module, run, child_env, "record:eval:6", signal.SIGINT)
    assert status == 128 + signal.SIGINT, err
    assert "stopped by SIGINT after step 6" in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "6"]

    finish(module, run, child_env)  # the real entry point, in a process of its own
    assert_jax_run_is_the_uninterrupted_one(run, reference)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [2, 4, 6, 8]


def torch_final_state(workdir: Path) -> dict:
    import torch

    payload = torch.load(workdir / "checkpoints" / "step_00000008.pt", weights_only=True)
    return {k: v.numpy() for k, v in payload["model"].items()}


@pytest.mark.slow  # ~22 s; the JAX run's kill test (same loop, same run folder code) runs by default
def test_torch_run_survives_sigkill_during_a_checkpoint_write_and_sigterm(tmp_path, child_env):
    module = "torch_ref.train"
    reference, run = tmp_path / "reference", tmp_path / "run"
    finish(module, reference, child_env)

    status, _ = interrupt(module, run, child_env, "in_save:4", signal.SIGKILL)
    assert status == -signal.SIGKILL
    left = sorted(p.name for p in (run / "checkpoints").iterdir())  # "." sorts first
    assert len(left) == 2 and left[0].startswith(".step_00000004.pt.") and left[1] == "step_00000002.pt"

    status, err = interrupt(module, run, child_env, "record:train:5", signal.SIGTERM)
    assert status == 128 + signal.SIGTERM and "stopped by SIGTERM after step 5" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000002.pt", "step_00000004.pt", "step_00000005.pt"]  # the half-written file is gone

    finish(module, run, child_env)
    got, want = torch_final_state(run), torch_final_state(reference)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert_metrics_are_those_of_the_uninterrupted_run(run, reference)
    assert_no_temporary_files(run)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_jax_run_survives_sigkill_at_random_times(tmp_path, child_env, seed):
    """Heavier variant: SIGKILL at random moments (not at pause points), restart, until the run ends."""
    module = "jax_impl.train"
    # A compilation cache of its own: a SIGKILL may land in the middle of a cache write.
    child_env = {**child_env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
    reference, run = tmp_path / "reference", tmp_path / "run"
    finish(module, reference, child_env)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        proc = start(module, run, child_env)
        time.sleep(float(rng.uniform(2.0, 6.0)))
        finished = proc.poll() is not None
        proc.kill()
        proc.communicate()  # also closes the pipes
        if finished:
            break
    finish(module, run, child_env)
    for got, want in zip(jax_final_state(run), jax_final_state(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert_metrics_are_those_of_the_uninterrupted_run(run, reference)
    assert_no_temporary_files(run)
