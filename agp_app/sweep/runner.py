"""The sweep's runs: train every grid point with the JAX trainer, measure, one row per run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from agp_app.config import TrainConfig
from agp_app.data import load_dataset
from agp_app.errors import NonFiniteError
from agp_app.sweep.grid import ATTACKED_PREFIX, SweepConfig, layers_label, run_label, train_config
from agp_app.sweep.measures import convention_numbers, measure, noise_draws
from agp_common.attack_spec import EVAL_ACCURACY_PREFIX
from jax_impl.model import Net


def _log(line: str) -> None:
    print(line, flush=True)  # one line per finished run, visible at once when stdout is a file


def run_sweep(sweep: SweepConfig, *, log=_log) -> list[dict[str, Any]]:
    """Train every grid point (weight 0 once per seed), measure, and return one row per run."""
    out = Path(sweep.out)
    ds = load_dataset(TrainConfig(dataset=sweep.dataset, data_dir=sweep.data_dir))
    noise = noise_draws(ds, sweep.noise)
    from agp_app.jax_train import init_params, train_and_evaluate  # heavy: imported only when training

    rows: list[dict[str, Any]] = []
    grid = sweep.grid()
    for i, (seed, layers, normalization, weight) in enumerate(grid):
        label = run_label(layers, normalization, weight, seed)
        workdir = out / "runs" / label
        config = train_config(sweep, seed, layers, normalization, weight, workdir, len(ds.y_train))
        t0 = time.perf_counter()
        row: dict[str, Any] = {"layers": layers_label(layers), "normalization": normalization,
                               "penalty_weight": weight, "seed": seed}
        try:
            result = train_and_evaluate(config, workdir, plots=False)
        except NonFiniteError as e:
            row.update({"status": f"diverged: {e}", "wall_s": time.perf_counter() - t0})
            rows.append(row)
            log(f"[{i + 1}/{len(grid)}] {label} diverged ({e})")
            continue
        row["status"] = "ok"
        row.update(measure(result.params, ds, sweep.batch_size, sweep.noise, noise))
        for key, value in (result.final_eval or {}).items():
            if key.startswith(EVAL_ACCURACY_PREFIX):  # eval_accuracy/fgsm@0.05 -> test_accuracy/fgsm@0.05
                row[ATTACKED_PREFIX + key.removeprefix(EVAL_ACCURACY_PREFIX)] = value
        row["wall_s"] = time.perf_counter() - t0
        if layers is None and seed == sweep.seeds[0]:
            initial = init_params(Net(num_classes=ds.num_classes), ds.image_shape, seed, np.float32)
            row["convention"] = {"at_init": convention_numbers(initial, ds, sweep.batch_size),
                                 "after_training_w0": convention_numbers(result.params, ds, sweep.batch_size)}
        rows.append(row)
        attacked = "  ".join(f"{k.removeprefix(ATTACKED_PREFIX)} {v:.3f}" for k, v in row.items()
                             if k.startswith(ATTACKED_PREFIX))
        log(f"[{i + 1}/{len(grid)}] {label}: clean {row['test_accuracy']:.3f}  {attacked}  "
            f"|grad_x| {row['test_grad_norm/input']:.3g}  ({row['wall_s']:.0f} s)")
    return rows
