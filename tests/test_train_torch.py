"""torch_ref.train: same run folder as jax_impl.train, exact resume, safe checkpoint loading, no JAX."""

import json
import shutil
import subprocess
import sys

import numpy as np
import torch

import torch_ref.train as train
from agp_common import TrainConfig
from tests.cli_runs import records

SMALL = TrainConfig(dataset="synthetic", synthetic_shape=(20, 16, 16, 1), batch_size=8, steps=6,
                    eval_every=3, checkpoint_every=3, keep_checkpoints=5, quiet=True)
TRAIN_KEYS = {"step", "epoch", "split", "loss", "penalty", "total", "accuracy", "grad_norm", "param_norm",
              "lr", "examples", "step_time_s", "examples_per_s", "penalty/relu1", "penalty/relu2",
              "act_grad_norm/relu1", "act_grad_norm/relu2"}


def test_torch_trainer_never_imports_jax():
    code = ("import sys, torch_ref.train; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_trains_on_digits_and_writes_the_same_run_folder_layout(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train.main(["--steps", "2", "--batch-size", "16", "--workdir", str(workdir), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done (torch): 2 steps")
    assert {p.name for p in workdir.iterdir()} == {"config.json", "metrics.jsonl", "checkpoints", "loss.png",
                                                   "grad_norms.png", "accuracy.png"}
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["step_00000002.pt"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["framework"] == "torch" and saved["dataset"]["image_shape"] == [32, 32, 1]
    train_records = [r for r in records(workdir) if r["split"] == "train"]
    assert set(train_records[0]) == TRAIN_KEYS  # the keys jax_impl.train writes
    assert [r["step"] for r in records(workdir) if r["split"] == "eval"] == [2]


def test_resumed_run_ends_bitwise_identical_to_an_uninterrupted_one(tmp_path):
    full = train.train_and_evaluate(SMALL, tmp_path / "full", plots=False)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full", interrupted)
    (interrupted / "checkpoints" / "step_00000006.pt").unlink()
    resumed = train.train_and_evaluate(SMALL, interrupted, plots=False)
    for layer, tensors in full.params.items():
        for name, value in tensors.items():
            np.testing.assert_array_equal(resumed.params[layer][name], value)
    assert [r["step"] for r in records(interrupted) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_corrupt_checkpoint_is_a_one_line_error(tmp_path, capsys):
    config = TrainConfig(**{**SMALL.__dict__, "steps": 3})
    train.train_and_evaluate(config, tmp_path, plots=False)
    (tmp_path / "checkpoints" / "step_00000003.pt").write_bytes(b"not a checkpoint")
    argv = ["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--batch-size", "8", "--steps", "6",
            "--workdir", str(tmp_path)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "unreadable" in err and len(err.strip().splitlines()) == 1


def test_a_resumed_run_steps_with_the_flags_lr_not_the_one_stored_in_the_checkpoint(tmp_path):
    full = train.train_and_evaluate(SMALL, tmp_path / "full", plots=False)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    (resumed_dir / "checkpoints" / "step_00000006.pt").unlink()
    path = resumed_dir / "checkpoints" / "step_00000003.pt"
    payload = torch.load(path, weights_only=True)
    for group in payload["optimizer"]["param_groups"]:  # an optimizer state saved with another lr
        group["lr"] = 100.0
    torch.save(payload, path)
    resumed = train.train_and_evaluate(SMALL, resumed_dir, plots=False)
    for layer, tensors in full.params.items():
        for name, value in tensors.items():  # exact: the same lr gives the same float operations
            np.testing.assert_array_equal(resumed.params[layer][name], value)


def test_a_checkpoint_damaged_on_disk_is_refused_naming_it_never_trained_on(tmp_path, capsys):
    config = TrainConfig(**{**SMALL.__dict__, "steps": 3})
    train.train_and_evaluate(config, tmp_path, plots=False)
    path = tmp_path / "checkpoints" / "step_00000003.pt"
    payload = torch.load(path, weights_only=True)
    weight = payload["model"]["conv1.weight"]
    weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(1.0, dtype=weight.dtype))  # 1 ulp
    torch.save(payload, path)  # the digest saved with it is the undamaged one
    argv = ["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--batch-size", "8", "--steps", "6",
            "--workdir", str(tmp_path)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {path}: damaged") and len(err.strip().splitlines()) == 1
    assert [r["step"] for r in records(tmp_path) if r["split"] == "train"] == [1, 2, 3]
