"""``python -m jax_impl.sweep``: flags, tables and plots (fast), and one real tiny sweep (slow)."""

import json

import pytest

from jax_impl import sweep


def fake_rows():
    base = {"status": "ok", "test_accuracy": 0.9, "noisy_accuracy@0.2": 0.8, "test_grad_rms/input": 0.3,
            "test_grad_rms/relu1": 0.2, "train_grad_rms/relu1": 0.1, "wall_s": 1.0}
    return [
        {"normalization": "none", "penalty_weight": 0.0, **base, "convention": {"loss": 1.0}},
        {"normalization": "batch_mean", "penalty_weight": 10.0, **base},
        {"normalization": "per_example", "penalty_weight": 10.0, **base, "test_grad_rms/relu1": 0.1},
        {"normalization": "per_example", "penalty_weight": 1000.0, "status": "diverged: NaN"},
    ]


def test_tables_and_plots_are_written_for_every_run(tmp_path):
    rows = fake_rows()
    sweep.write_tables(rows, tmp_path, sweep.SweepConfig())
    sweep.plot_results(rows, tmp_path)
    md = (tmp_path / "results.md").read_text().splitlines()
    assert len(md) == 2 + len(rows) and "diverged" in md[-1]
    assert json.loads((tmp_path / "convention.json").read_text()) == {"loss": 1.0}
    assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == len(rows)
    assert (tmp_path / "results.csv").read_text().startswith("normalization,penalty_weight,status")
    for name in ("grad_norm_vs_weight.png", "accuracy_vs_weight.png", "noisy_accuracy_vs_weight.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_data_dir_selects_cifar10_and_bad_flags_exit_2(capsys):
    assert sweep.parse_sweep(["--data-dir", "/d"]).dataset == "cifar10"
    assert sweep.parse_sweep([]).out == "runs/sweep_digits"
    for argv in (["--weights", "1,x"], ["--weights", "-1"], ["--normalizations", "mean"]):
        with pytest.raises(SystemExit) as e:
            sweep.parse_sweep(argv)
        assert e.value.code == 2
    assert sweep.main(["--weights", "", "--out", "/nonexistent/x"]) == 2
    assert "--weights is empty" in capsys.readouterr().err


@pytest.mark.slow
def test_one_epoch_sweep_on_digits_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    assert sweep.main(["--weights", "0,10", "--normalizations", "batch_mean", "--epochs", "1",
                       "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["normalization"] for r in rows] == ["none", "batch_mean"]
    assert all(0.5 < r["test_accuracy"] <= 1.0 for r in rows)
    conv = json.loads((out / "convention.json").read_text())
    # float32 sums of 32 per-example terms: a few ulps of relative error.
    assert conv["at_init"]["per_example_over_batch_mean"] == pytest.approx(32, rel=1e-3)


def test_measure_reports_accuracies_and_per_layer_gradient_norms():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from agp_common.data import Dataset
    from jax_impl import Net

    rng = np.random.default_rng(0)
    x = rng.random((10, 16, 16, 1), np.float32)
    y = rng.integers(0, 3, 10).astype(np.int32)
    ds = Dataset("tiny", x[:6], y[:6], x[6:], y[6:], num_classes=3)
    params = Net(num_classes=3).init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
    noise = sweep.noise_draws(ds, (0.0, 0.5))
    out = sweep.measure(params, ds, 4, (0.0, 0.5), noise)
    assert out["noisy_accuracy@0"] == out["test_accuracy"]  # sigma 0 is the clean test set
    for split in ("test_", "train_"):
        for name in ("input", "relu1", "relu2"):
            # RMS >= mean of the norms (Jensen), both positive.
            assert out[f"{split}grad_rms/{name}"] >= out[f"{split}grad_norm/{name}"] * (1 - 1e-6) > 0
    assert 0 <= out["train_accuracy"] <= 1
