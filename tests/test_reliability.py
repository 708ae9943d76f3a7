"""Checkpoints that cannot be resumed: corrupt, truncated, another model shape, another config.

Each gets one line naming the checkpoint and what is wrong, exit 2, and the
workdir is left exactly as it was (config.json, metrics.jsonl and every
checkpoint byte-identical). Also: the library's own input checks surface in
``train_and_evaluate``, and a diverging PyTorch run stops naming the step.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_impl.train as train
from agp_common import ModelInputError
from tests.cli_runs import run_main
from tests.npz_runs import (
    assert_one_line_error,
    cli_args,
    good_arrays,
    npz_config,
    snapshot,
    write_npz,
)

# A failed orbax restore leaves an un-awaited coroutine of orbax's own behind; it is finalised by the
# garbage collector (below, before the last test of this module ends, so that the report comes inside
# this module, under this filter) and only reported, never raised.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in.*coroutine:pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(autouse=True, scope="module")
def collect_orbax_leftovers():
    yield
    gc.collect()  # once per module: a full collection takes ~0.5 s in a process holding JAX and PyTorch


def newest_state_files(run: Path) -> list[Path]:
    return [p for p in (run / "checkpoints" / "2" / "state").rglob("*") if p.is_file()]


def corrupt(run: Path) -> None:
    for p in newest_state_files(run):
        p.write_bytes(b"\x00garbage" * 8)


def truncate(run: Path) -> None:
    for p in newest_state_files(run):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def delete_state(run: Path) -> None:
    shutil.rmtree(run / "checkpoints" / "2" / "state")


def corrupt_config_item(run: Path) -> None:
    for p in (run / "checkpoints" / "2" / "config").rglob("*"):
        if p.is_file():
            p.write_text("{not json")


@pytest.mark.parametrize("damage", [corrupt, truncate, delete_state, corrupt_config_item])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_it(damage, template, existing_run, capsys):
    (data, _), run = template, existing_run
    damage(run)
    before = snapshot(run)
    status, err = run_main("jax", cli_args(npz_config(data, steps=4), run), capsys)
    assert_one_line_error(status, err, f"checkpoint {(run / 'checkpoints' / '2').absolute()}: ")
    assert "steps saved: [1, 2]" in err  # says how to fall back to the previous checkpoint
    assert snapshot(run) == before


def test_moving_the_damaged_checkpoint_away_resumes_from_the_one_before(template, existing_run, capsys):
    (data, _), run = template, existing_run
    corrupt(run)
    shutil.move(run / "checkpoints" / "2", run.parent / "bad_checkpoint")
    status, err = run_main("jax", cli_args(npz_config(data, steps=3), run), capsys)
    assert status == 0, err


def test_data_of_another_shape_is_refused_as_another_model(existing_run, tmp_path, capsys):
    run = existing_run
    arrays = good_arrays()
    arrays["x"] = np.zeros((len(arrays["y"]), 20, 20, 1), np.float32)
    arrays["x_test"] = np.zeros((len(arrays["y_test"]), 20, 20, 1), np.float32)
    other = write_npz(tmp_path / "bigger.npz", **arrays)
    before = snapshot(run)
    status, err = run_main("jax", cli_args(npz_config(other), run), capsys)
    assert_one_line_error(status, err, "image_shape [16, 16, 1] then, [20, 20, 1] now")
    assert snapshot(run) == before


def test_a_checkpoint_of_another_config_is_refused_even_without_config_json(template, existing_run, capsys):
    (data, _), run = template, existing_run
    (run / "config.json").unlink()
    before = snapshot(run)
    status, err = run_main("jax", [*cli_args(npz_config(data), run), "--optimizer", "adam"], capsys)
    assert_one_line_error(status, err, "optimizer: saved 'sgd', now 'adam'")
    assert err.startswith(f"error: checkpoint {(run / 'checkpoints' / '2').absolute()}")
    assert snapshot(run) == before


def test_params_of_another_shape_get_the_library_error_naming_the_expected_shape(template, tmp_path):
    data, _ = template
    model = train.Net(num_classes=10)
    # For 32x32x3 images: their shapes (zeros) are all the check reads, without running init.
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    with pytest.raises(ModelInputError, match=r"expected images of shape \(B, 32, 32, 3\)"):
        train.train_and_evaluate(npz_config(data), tmp_path / "run", params=params, plots=False)


def test_torch_cli_stops_a_diverging_run_naming_the_step_and_keeps_the_good_checkpoints(tmp_path, capsys):
    import torch_ref.train as torch_train

    workdir = tmp_path / "run"
    argv = ["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--batch-size", "8", "--steps", "6",
            "--checkpoint-every", "1", "--lr", "1e30", "--quiet", "--workdir", str(workdir)]
    assert torch_train.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: step ") and ("NaN" in err[0] or "nan" in err[0])
    saved = sorted((workdir / "checkpoints").glob("step_*.pt"))
    import torch

    for path in saved:  # every checkpoint on disk holds finite parameters
        state = torch.load(path, weights_only=True)["model"]
        assert all(bool(torch.isfinite(v).all()) for v in state.values())
    losses = [r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert all(np.isfinite(losses))  # the non-finite step is not logged either


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_torch_checkpoint_is_refused_not_run(tmp_path, capsys):
    import torch

    import torch_ref.train as torch_train

    marker = tmp_path / "pwned"
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"step": 1, "model": _Exploit(marker)}, folder / "step_00000001.pt")
    argv = ["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--batch-size", "8", "--steps", "2",
            "--quiet", "--workdir", str(tmp_path / "run")]
    status = torch_train.main(argv)
    err = capsys.readouterr().err
    assert_one_line_error(status, err, "unreadable, corrupt or truncated (UnpicklingError")
    assert not marker.exists()
