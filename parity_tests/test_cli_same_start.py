"""``--init shared``: the two training CLIs start from identical weights and follow the same trajectory.

Both CLIs draw the initial weights with ``agp_app.shared_init`` (no ``params`` passed in), read the
same batch order, augment the same images (``--augment``), step the same learning-rate schedule and
weight decay; in float64 their step losses agree to rounding (1e-10), and
``parity_tests.compare_runs`` reports it for every logged metric. This file imports both frameworks
on purpose (parity_tests is the cross-framework package).

The runs parse the CLIs' flags and train as the CLIs do, without the plots (~0.5 s a run; the CLIs'
plots are tested in tests/). The seeded runs use the momentum and weight decay of the coupled
recipe: the JAX step that test compiled is reused (``compiled_steps`` is keyed on them).
"""

import json

import numpy as np
import pytest

import jax_impl.train as jax_train
import torch_ref.train as torch_train
from agp_common import parse_config
from parity_tests.compare_runs import main as compare_runs

# 20 examples in batches of 8 over 5 steps: an epoch boundary and a partial (in JAX padded) batch.
DATA = ["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--batch-size", "8",
        "--dtype", "float64", "--quiet"]
OPTIMIZER = ["--optimizer", "momentum", "--weight-decay", "1e-3"]
RECIPE = [*DATA, *OPTIMIZER, "--steps", "5", "--init", "shared", "--lr-schedule", "cosine",
          "--warmup-steps", "1", "--augment", "crop,flip"]
TRAINERS = {"jax": jax_train, "torch": torch_train}


def train(framework, argv, workdir):
    """``argv`` parsed as the ``framework``'s CLI parses it, trained in ``workdir`` (no plots)."""
    config = parse_config([*argv, "--workdir", str(workdir)], prog="test", framework=framework)
    TRAINERS[framework].train_and_evaluate(config, plots=False)


def train_losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.mark.parametrize("form", ["coupled", "decoupled"])
def test_shared_init_gives_the_same_losses_in_both_clis_float64(tmp_path, capsys, form):
    runs = {"jax": tmp_path / "jax", "torch": tmp_path / "torch"}
    for name in runs:
        train(name, [*RECIPE, "--weight-decay-form", form], runs[name])
    jax_losses, torch_losses = train_losses(runs["jax"]), train_losses(runs["torch"])
    assert len(jax_losses) == 5
    # float64 from the same weights, data and updates: only summation order differs (~1e-16 per step)
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=0, atol=1e-10)
    capsys.readouterr()
    assert compare_runs([str(runs["jax"]), str(runs["torch"]), "--rtol", "1e-10"]) == 0
    assert "train/loss" in capsys.readouterr().out


def test_seeded_init_differs_between_the_clis(tmp_path):
    """Without ``--init shared`` each framework draws its own weights (the reason for the flag)."""
    seeded = [*DATA, *OPTIMIZER, "--steps", "1"]  # the coupled recipe's compiled JAX step
    for name in TRAINERS:
        train(name, seeded, tmp_path / name)
    assert abs(train_losses(tmp_path / "jax")[0] - train_losses(tmp_path / "torch")[0]) > 1e-6
