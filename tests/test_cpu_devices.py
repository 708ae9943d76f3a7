"""``--cpu-devices``: the JAX CLI splits a CPU into several JAX devices for large batches.

The choice is a pure function of the batch size and the cores (tested as a table); applying it
needs a fresh process, so the flag is checked on real CLI processes: auto at batch 128 on two or
more cores announces the split, and an explicit count reaches the device mesh (a batch it does not
divide is refused by the mesh's own check). A count that can never apply (0) is refused before
any device is set up, so that one line is checked on ``main`` in this process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from agp_common import TrainConfig
from agp_common.config import parse_config
from agp_common.errors import UsageError
from jax_impl import onednn_conv
from jax_impl.train import auto_cpu_devices, choose_cpu_devices, configure_cpu_devices, main, usable_cores

SMALL_RUN = ["--dataset", "synthetic", "--synthetic-shape", "128,16,16,1", "--steps", "1", "--quiet"]


@pytest.mark.parametrize(("batch_size", "cores", "expected"), [
    (1, 2, 1), (32, 2, 1), (64, 2, 1), (127, 2, 1),  # under two devices' worth of examples: one
    (128, 2, 2), (130, 2, 2), (1024, 2, 2),  # at most one device per core
    (129, 2, 1),  # two devices would not split 129 evenly
    (1024, 16, 16), (192, 16, 3), (96, 16, 1), (640, 16, 10),
    (128, 1, 1),  # one core: one device
])
def test_auto_gives_each_device_64_examples_one_device_per_core_and_divides_the_batch(
        batch_size, cores, expected):
    n = choose_cpu_devices(batch_size, cores)
    assert n == expected
    assert batch_size % n == 0


def test_auto_keeps_one_device_for_onednn_several_processes_or_a_device_count_in_xla_flags():
    big = TrainConfig(batch_size=256, conv_impl="canonical")
    assert auto_cpu_devices(big, 4, "", distributed=False) == 4
    assert auto_cpu_devices(big, 4, "--xla_cpu_enable_fast_math=false", distributed=False) == 4
    assert auto_cpu_devices(TrainConfig(batch_size=256, conv_impl="onednn"), 4, "", distributed=False) == 1
    auto = 1 if onednn_conv.library_built() else 4  # auto runs oneDNN where its library is built
    assert auto_cpu_devices(TrainConfig(batch_size=256), 4, "", distributed=False) == auto
    assert auto_cpu_devices(big, 4, "", distributed=True) == 1
    assert auto_cpu_devices(big, 4, "--xla_force_host_platform_device_count=3", distributed=False) == 1


def test_the_flag_reads_auto_or_a_count_and_refuses_zero():
    prog, fw = "python -m jax_impl.train", "jax"
    assert parse_config(["--cpu-devices", "auto"], prog, fw).cpu_devices is None
    assert parse_config([], prog, fw).cpu_devices is None
    assert parse_config(["--cpu-devices", "3"], prog, fw).cpu_devices == 3
    with pytest.raises(SystemExit):
        parse_config(["--cpu-devices", "two"], prog, fw)


def test_an_explicit_count_that_no_longer_applies_is_a_usage_error():
    """In a process whose JAX already runs (this one), auto keeps the devices; an explicit other count
    cannot be honoured and says so."""
    import jax

    have = len(jax.devices("cpu"))
    assert configure_cpu_devices(TrainConfig(batch_size=1024), distributed=False) is None
    assert configure_cpu_devices(TrainConfig(cpu_devices=have), distributed=False) is None
    with pytest.raises(UsageError, match=rf"--cpu-devices {have + 1}: JAX already runs with {have} CPU"):
        configure_cpu_devices(TrainConfig(cpu_devices=have + 1), distributed=False)


def _cli(*flags: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jax_impl.train", *SMALL_RUN, "--workdir",
                           str(tmp_path / "run"), *flags], capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a real 2-device compile (~10 s); auto's choice itself is tested as a table above
@pytest.mark.skipif(usable_cores() < 2, reason="auto uses one device on a single core")
def test_auto_splits_a_batch_of_128_over_two_devices_and_says_so(tmp_path):
    proc = _cli("--batch-size", "128", "--conv-impl", "canonical", tmp_path=tmp_path)  # oneDNN: 1 device
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the batch of 128 is split over 2 devices" in proc.stdout
    assert "--cpu-devices 1 turns this off" in proc.stdout


def test_an_explicit_count_reaches_the_device_mesh(tmp_path):
    """A fresh process (the count applies only at JAX's start): 3 devices refuse a batch of 8."""
    proc = _cli("--batch-size", "8", "--cpu-devices", "3", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --batch-size 8 must be a multiple of the number of devices (3) so that every device gets "
        "the same number of examples"]
    assert not (tmp_path / "run").exists()


def test_a_zero_count_is_a_one_line_usage_error_with_exit_2(tmp_path, capsys):
    """Refused when the config is validated, before JAX's devices are set up: the CLI's ``main`` in this
    process (that a usage error is the real process's exit status 2 is tested in tests/test_bad_input.py)."""
    assert main([*SMALL_RUN, "--cpu-devices", "0", "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--cpu-devices must be 'auto' or between 1 and 1024, got 0" in err
    assert not (tmp_path / "run").exists()
