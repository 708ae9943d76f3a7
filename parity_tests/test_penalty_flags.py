"""The training CLIs' penalty-option flags: parsed, validated, and used by both frameworks alike.

Cross-framework (imports JAX and PyTorch): lives in parity_tests.

The default suite trains once with every penalty flag set (``ALL_FLAGS``): each
flag's value must reach both frameworks' loss for the two runs to agree, and
the finite difference, the l2 norm, per-example normalisation and an input
capture point combine (``test_penalty_options.py`` checks that combination's
formula). Each run costs XLA compilations of the CLI's steps (5-10 s); the
two runs with half of the flags each run with ``-m slow``.
"""

import json

import numpy as np
import pytest
import torch

import jax_impl.train as jax_train
import torch_ref.train as torch_train
from agp_common import TrainConfig, load_dataset
from agp_common.config import parse_config
from agp_common.errors import UsageError
from torch_ref import Net, export_flax_params

FLAGS = ["--penalty-normalization", "per_example", "--penalty-norm", "l2", "--penalty-every", "2",
         "--penalty-approx", "finite_difference", "--penalty-fd-step", "0.01",
         "--penalty-layers", "input,relu2"]


def test_flags_fill_the_config_and_defaults_are_the_seed_recipe():
    config = parse_config(FLAGS, prog="t", framework="jax")
    assert (config.penalty_normalization, config.penalty_norm, config.penalty_every, config.penalty_approx,
            config.penalty_fd_step, config.penalty_layers) == (
        "per_example", "l2", 2, "finite_difference", 0.01, ("input", "relu2"))
    default = parse_config([], prog="t", framework="jax")
    assert (default.penalty_normalization, default.penalty_norm, default.penalty_every,
            default.penalty_approx) == ("batch_mean", "squared_l2", 1, "exact")


@pytest.mark.parametrize(("argv", "message"), [
    (["--penalty-every", "0"], "--penalty-every must be a positive integer"),
    (["--penalty-fd-step", "0"], "--penalty-fd-step must be a finite number > 0"),
])
def test_bad_penalty_flags_are_usage_errors(argv, message):
    config = parse_config(argv, prog="t", framework="jax")
    with pytest.raises(UsageError, match=message):
        jax_train.validate_config(config)


def test_bad_choice_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--penalty-norm", "l1"], prog="t", framework="jax")
    assert e.value.code == 2


def train_records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


EXACT_FLAGS = {"penalty_normalization": "per_example", "penalty_norm": "l2",
               "penalty_layers": ("input", "relu2")}
LAZY_FD_FLAGS = {"penalty_every": 2, "penalty_approx": "finite_difference", "penalty_fd_step": 0.01}
ALL_FLAGS = {**EXACT_FLAGS, **LAZY_FD_FLAGS}


@pytest.mark.parametrize("options", [
    pytest.param(ALL_FLAGS, id="all"),
    pytest.param(EXACT_FLAGS, id="exact", marks=pytest.mark.slow),
    pytest.param(LAZY_FD_FLAGS, id="lazy_fd", marks=pytest.mark.slow),
])
def test_jax_and_torch_training_agree_with_penalty_options_float64(tmp_path, options):
    # 12 examples in batches of 8: steps alternate full and partial (padded + masked in JAX) batches.
    config = TrainConfig(dataset="synthetic", synthetic_shape=(12, 16, 16, 1), steps=4, batch_size=8,
                         lr=0.05, penalty_weight=10.0, dtype="float64", eval_every=4, checkpoint_every=4,
                         quiet=True, **options)
    ds = load_dataset(config)
    torch.manual_seed(1)
    initial = export_flax_params(Net(in_channels=1, num_classes=ds.num_classes, image_size=16).double())
    jax_train.train_and_evaluate(config, tmp_path / "jax", params=initial, plots=False)
    torch_train.train_and_evaluate(config, tmp_path / "torch", params=initial, plots=False)
    jax_steps, torch_steps = train_records(tmp_path / "jax"), train_records(tmp_path / "torch")
    assert len(jax_steps) == len(torch_steps) == 4
    for key in ("loss", "penalty", "total"):
        # Float64 rounding through 4 steps (finite difference: amplified by 1/h = 100): 1e-9.
        np.testing.assert_allclose([r[key] for r in jax_steps], [r[key] for r in torch_steps], rtol=1e-9,
                                   atol=1e-15, err_msg=key)
    if config.penalty_every == 2:
        assert [r["penalty"] == 0 for r in jax_steps] == [False, True, False, True]
