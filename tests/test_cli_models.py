"""The training CLIs' --model, --penalty-layers by module path, the recipe flags, and what they print.

Runs the CLIs in the test process on small synthetic data: a user's Flax module and its PyTorch twin
written to a temporary folder outside the project, resnet18 on a CIFAR-10 folder in the python-pickle
format made here, resumes that refuse changed recipes and accept equivalent spellings, and the summary
lines. Tests of what ``main([...])`` prints or returns call it; runs that must train parse the same flags
and call ``train_and_evaluate(..., plots=False)``, as ``tests.cli_runs.resume_without_plots`` does: the
CLI's plots cost ~0.5 s a run, and tests/test_run_folder.py checks them.
"""

from __future__ import annotations

import json
import pickle
import textwrap

import numpy as np
import pytest

import jax_impl.train as jax_train
import torch_ref.train as torch_train
from agp_common import parse_config
from tests.cli_runs import TRAINS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYNTHETIC = ["--dataset", "synthetic", "--synthetic-shape", "64,16,16,1", "--batch-size", "8", "--quiet"]

USER_FLAX = """
import flax.linen as nn

class SmallNet(nn.Module):
    num_classes: int = 10
    width: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (3, 3), name="conv")(x))
        x = nn.avg_pool(x, (4, 4), (4, 4)).reshape(x.shape[0], -1)  # a coarse map: where, not only how much
        x = nn.relu(nn.Dense(16, name="hidden")(x))
        return nn.Dense(self.num_classes, name="head")(x)
"""

USER_TORCH = """
from torch import nn

class SmallNet(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, width=8):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.pool = nn.AvgPool2d(4)  # a coarse map: where, not only how much
        self.hidden = nn.LazyLinear(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.pool(self.conv(x).relu()).flatten(1)
        return self.head(self.hidden(x).relu())
"""


def records(workdir, split="train"):
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """``my_flax_models:SmallNet`` and ``my_torch_models:SmallNet`` importable from a folder outside
    the project (as ``python -m`` finds them in the current folder)."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "my_flax_models.py").write_text(textwrap.dedent(USER_FLAX))
    (folder / "my_torch_models.py").write_text(textwrap.dedent(USER_TORCH))
    monkeypatch.syspath_prepend(str(folder))
    return folder


@pytest.mark.parametrize(("framework", "module"), [("jax", "my_flax_models"), ("torch", "my_torch_models")])
def test_a_users_model_trains_with_the_penalty_on_module_paths(tmp_path, user_models, framework, module):
    workdir = tmp_path / "run"
    argv = [*SYNTHETIC, "--model", f"{module}:SmallNet", "--model-args", '{"width": 6}', "--penalty-layers",
            "conv,hidden", "--steps", "120", "--lr", "0.2", "--eval-every", "120", "--workdir", str(workdir)]
    TRAINS[framework](parse_config(argv, "test", framework), plots=False)
    losses = [r["loss"] for r in records(workdir)]
    # the model learns (15 epochs of 64 images): the mean loss of the last 10 steps at most 0.8 of the
    # first 10's (measured 0.55 with JAX, 0.47 with PyTorch; with a learning rate of 1e-9, 1.00 and 0.99)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert all(r["penalty/conv"] > 0 and r["penalty/hidden"] > 0 for r in records(workdir))
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"] == {"name": f"{module}:SmallNet", "args": {"width": 6}}
    assert saved["penalised"] == {"conv": "conv", "hidden": "hidden"}


@pytest.mark.parametrize("main", [jax_train.main, torch_train.main])
def test_an_uncalled_module_path_is_a_one_line_error(tmp_path, user_models, capsys, main):
    module = "my_flax_models" if main is jax_train.main else "my_torch_models"
    argv = [*SYNTHETIC, "--model", f"{module}:SmallNet", "--penalty-layers", "convv", "--steps", "1",
            "--workdir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--penalty-layers" in err and "convv" in err
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_model_without_capture_points_needs_penalty_layers(tmp_path, capsys):
    argv = [*SYNTHETIC, "--model", "resnet18", "--steps", "1", "--workdir", str(tmp_path / "run")]
    assert torch_train.main(argv) == 2
    assert "has no capture() points" in capsys.readouterr().err


def write_cifar_python_folder(folder, per_batch=8, seed=0):
    """A CIFAR-10 "python version" release in miniature: data_batch_1..5 and test_batch, each a pickled
    dict of uint8 (N, 3072) CHW rows and integer labels, as the official archive holds them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_resnet18_trains_on_a_cifar10_folder_with_augmentation_and_a_cosine_schedule(tmp_path):
    # Two stages of one block each: the full depth costs ~30 s of XLA compilation here, and its
    # penalty gradients are proven against PyTorch in parity_tests/test_resnet18_twins.py.
    data = tmp_path / "cifar-10-batches-py"
    write_cifar_python_folder(data)
    workdir = tmp_path / "run"
    # --init shared: weights drawn in NumPy for init's shapes (jax.eval_shape); compiling this ResNet's
    # seeded init took twice as long as its train step (that path, jax.jit(model.init), every CNN run takes).
    argv = ["--model", "resnet18", "--model-args", '{"width": 2, "blocks": [1, 1]}', "--dataset", "cifar10",
            "--data-dir", str(data), "--augment", "crop,flip", "--lr-schedule", "cosine",
            "--warmup-steps", "1", "--penalty-layers", "layer1.0,layer2.0", "--steps", "3",
            "--batch-size", "8", "--quiet", "--init", "shared", "--workdir", str(workdir)]
    jax_train.train_and_evaluate(parse_config(argv, "test", "jax"), plots=False)
    train = records(workdir)
    # warm-up from 0, then cosine from --lr 0.05 to 0 over the 2 remaining updates
    np.testing.assert_allclose([r["lr"] for r in train], [0.0, 0.05, 0.025], rtol=1e-6)  # float32 rates
    assert all(np.isfinite(r["loss"]) and r["penalty/layer1.0"] > 0 for r in train)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["penalised"] == {"layer1.0": "layer1.0", "layer2.0": "layer2.0"}
    assert saved["config"]["augment"] == ["crop", "flip"] and saved["config"]["lr_schedule"] == "cosine"


def test_resume_refuses_a_changed_recipe_and_accepts_equivalent_spellings(tmp_path, capsys):
    run = [*SYNTHETIC, "--workdir", str(tmp_path / "run")]
    base = [*run, "--weight-decay", "1e-3", "--augment", "crop,flip"]
    assert torch_train.main([*base, "--model-args", '{"conv_impl": "xla"}', "--steps", "2"]) == 2
    assert "conv_impl" in capsys.readouterr().err  # torch's Net takes no conv_impl: one line, nothing written
    assert torch_train.main([*base, "--steps", "2"]) == 0
    capsys.readouterr()
    assert torch_train.main([*run, "--weight-decay", "0.001", "--augment", "flip, crop", "--steps", "3"]) == 0
    assert "resumed at step 2, trained 1 steps" in capsys.readouterr().out
    assert torch_train.main([*base, "--weight-decay-form", "decoupled", "--steps", "4"]) == 2
    assert "weight_decay_form" in capsys.readouterr().err
    assert torch_train.main([*run, "--weight-decay", "1e-3", "--augment", "flip", "--steps", "4"]) == 2
    assert "augment" in capsys.readouterr().err


def test_summaries_say_already_complete_and_which_steps_carried_the_lazy_penalty(tmp_path, capsys):
    argv = [*SYNTHETIC, "--steps", "5", "--penalty-every", "2", "--workdir", str(tmp_path / "run")]
    assert torch_train.main(argv) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert first.startswith("done (torch): 5 steps in ")
    last = records(tmp_path / "run")[-1]  # step 5 = update 4, a penalty step
    assert f"penalty on every 2nd step (last {last['penalty']:.3e} at step 5)" in first
    assert torch_train.main(argv) == 0
    again = capsys.readouterr().out.strip().splitlines()[-1]
    assert again.startswith("done (torch): already complete at step 5")
    assert "0.000e+00" not in again


def test_the_default_workdir_differs_for_different_configs():
    from agp_app.flags import parse_config

    def workdir(*argv):
        return parse_config(list(argv), "prog", "jax").workdir

    assert workdir() == "runs/jax_digits_cnn"
    assert workdir("--epochs", "2") == workdir()  # a longer run of the same config resumes
    names = {workdir(), workdir("--penalty-weight", "0"), workdir("--model", "resnet18"),
             workdir("--optimizer", "adam"), workdir("--augment", "flip"), workdir("--init", "shared")}
    assert len(names) == 6
    assert workdir("--augment", "crop,flip") == workdir("--augment", "flip,crop")


def test_bfloat16_mixed_precision_keeps_float32_weights_and_trains(tmp_path):
    workdir = tmp_path / "run"
    argv = [*SYNTHETIC, "--dtype", "bfloat16", "--steps", "4", "--workdir", str(workdir)]
    result = jax_train.train_and_evaluate(parse_config(argv, "test", "jax"), plots=False)
    assert all(v.dtype == np.float32 for layer in result.params.values() for v in layer.values())
    assert all(np.isfinite(r["loss"]) and r["penalty"] > 0 for r in records(workdir))
