"""``python -m jax_impl.sweep``: grid, flags, summary over seeds, tables, plots; a real tiny sweep (slow)."""

import json
import math

import pytest

from jax_impl import sweep


def fake_row(layers, weight, seed, accuracy, status="ok"):
    if status != "ok":
        return {"layers": layers, "normalization": "per_example", "penalty_weight": weight, "seed": seed,
                "status": status}
    return {"layers": layers, "normalization": "none" if layers == "none" else "per_example",
            "penalty_weight": weight, "seed": seed, "status": "ok", "test_accuracy": accuracy,
            "test_accuracy/fgsm@0.1": accuracy - 0.3, "test_accuracy/pgd@0.1": accuracy - 0.4,
            "noisy_accuracy@0.2": accuracy - 0.05, "test_grad_norm/input": 0.2, "test_grad_median/input": 0.1,
            "test_grad_rms/input": 0.3, "test_grad_rms/relu1": 0.2, "train_loss": 0.1, "wall_s": 10.0}


def fake_rows():
    rows = []
    for seed, acc in ((0, 0.9), (1, 0.8)):
        rows += [fake_row("none", 0.0, seed, acc), fake_row("input", 1.0, seed, acc - 0.05),
                 fake_row("relu1+relu2", 1.0, seed, acc)]
    rows[0]["convention"] = {"loss": 1.0}
    rows.append(fake_row("relu1+relu2", 10.0, 0, 0.0, status="diverged: NaN"))
    return rows


def test_summary_gives_mean_sd_min_max_over_the_seeds_that_finished():
    summary = {(e["layers"], e["penalty_weight"]): e for e in sweep.summarize(fake_rows())}
    base = summary[("none", 0.0)]
    assert base["seeds"] == base["seeds_ok"] == 2
    # accuracies 0.9 and 0.8: mean 0.85, sample sd |0.9 - 0.8| / sqrt(2), by hand.
    assert base["test_accuracy"] == pytest.approx({"mean": 0.85, "sd": 0.1 / math.sqrt(2), "min": 0.8,
                                                   "max": 0.9})
    diverged = summary[("relu1+relu2", 10.0)]
    assert diverged["seeds_ok"] == 0 and "test_accuracy" not in diverged


def test_tables_and_plots_are_written_with_one_line_per_grid_point(tmp_path):
    rows = fake_rows()
    sweep.write_tables(rows, tmp_path, sweep.SweepConfig(), wall_s=12.0)
    paths = sweep.plot_results(rows, tmp_path)
    md = (tmp_path / "results.md").read_text().splitlines()
    assert len(md) == 2 + 4  # header, rule, four grid points (two seeds each, or one diverged)
    assert "| clean | fgsm@0.1 | pgd@0.1 | noise 0.2 |" in md[0]
    assert "| none | none | 0 | 2 | 0.850 ± 0.071 | 0.550 ± 0.071 |" in md[2]
    assert md[-1].startswith("| relu1+relu2 | per_example | 10 | 0 of 1 | diverged |")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(rows) and len(saved["summary"]) == 4 and saved["wall_s"] == 12.0
    assert json.loads((tmp_path / "convention.json").read_text()) == {"loss": 1.0}
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header.startswith("layers,normalization,penalty_weight,seed,status")
    assert [p.name for p in paths] == ["robustness_vs_weight.png", "grad_norm_vs_weight.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_the_default_grid_trains_the_baseline_once_per_seed():
    grid = sweep.SweepConfig().grid()
    assert len(grid) == 3 * (1 + 4 * 3)
    assert [(s, w) for s, layers, _, w in grid if layers is None] == [(0, 0.0), (1, 0.0), (2, 0.0)]
    assert {layers for _, layers, _, _ in grid} == {None, ("input",), ("relu1",), ("relu2",),
                                                    ("relu1", "relu2")}


def test_flags_keep_the_old_spelling_and_bad_values_exit_2(capsys):
    assert sweep.parse_sweep(["--data-dir", "/d"]).dataset == "cifar10"
    assert sweep.parse_sweep([]).out == "runs/sweep_digits"
    assert sweep.parse_sweep(["--seed", "3"]).seeds == (3,)  # the old single-seed flag
    parsed = sweep.parse_sweep(["--layers", "input,relu1+relu2", "--eval-attacks", "fgsm"])
    assert parsed.layer_sets == (("input",), ("relu1", "relu2")) and parsed.eval_attacks == ("fgsm",)
    for argv in (["--weights", "1,x"], ["--weights", "-1"], ["--normalizations", "mean"],
                 ["--layers", "conv1"], ["--seeds", "0,0"]):
        with pytest.raises(SystemExit) as e:
            sweep.parse_sweep(argv)
        assert e.value.code == 2
    capsys.readouterr()
    assert sweep.main(["--weights", "", "--out", "/nonexistent/x"]) == 2
    assert "--weights is empty" in capsys.readouterr().err
    assert sweep.main(["--eval-eps", "0", "--out", "/nonexistent/x"]) == 2
    assert "--eval-eps must be one or more finite numbers > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_one_epoch_sweep_on_digits_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    assert sweep.main(["--weights", "0,10", "--layers", "input", "--seeds", "0", "--epochs", "1",
                       "--eval-eps", "0.1", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["layers"], r["penalty_weight"]) for r in rows] == [("none", 0.0), ("input", 10.0)]
    assert all(0.5 < r["test_accuracy"] <= 1.0 for r in rows)
    assert all(r["test_accuracy/pgd@0.1"] < r["test_accuracy"] for r in rows)
    conv = json.loads((out / "convention.json").read_text())
    # float32 sums of 32 per-example terms: a few ulps of relative error.
    assert conv["at_init"]["per_example_over_batch_mean"] == pytest.approx(32, rel=1e-3)


def test_measure_reports_accuracies_and_per_layer_gradient_norms():
    import numpy as np

    from agp_common.data import Dataset
    from jax_impl import Net
    from tests._model_fixtures import params_like

    rng = np.random.default_rng(0)
    x = rng.random((10, 16, 16, 1), np.float32)
    y = rng.integers(0, 3, 10).astype(np.int32)
    ds = Dataset("tiny", x[:6], y[:6], x[6:], y[6:], num_classes=3)
    params = params_like(Net(num_classes=3), x[:1], dtype=np.float32)  # Net's shapes, no init run
    noise = sweep.noise_draws(ds, (0.0, 0.5))
    out = sweep.measure(params, ds, 4, (0.0, 0.5), noise)
    assert out["noisy_accuracy@0"] == out["test_accuracy"]  # sigma 0 is the clean test set
    for split in ("test_", "train_"):
        for name in ("input", "relu1", "relu2"):
            # RMS >= mean of the norms (Jensen), both positive.
            assert out[f"{split}grad_rms/{name}"] >= out[f"{split}grad_norm/{name}"] * (1 - 1e-6) > 0
        assert out[f"{split}grad_median/input"] > 0
    assert 0 <= out["train_accuracy"] <= 1
