"""``python -m jax_impl.sweep``: what the penalty does, as an experiment over layers, weights and seeds.

For every seed, every penalised layer set (``--layers``: ``input`` is the
input-gradient penalty of double backpropagation, ``relu1``, ``relu2``, and
``relu1+relu2`` the answer's), every normalisation and every weight > 0 it
trains the seed CNN with ``jax_impl.train.train_and_evaluate`` (digits by
default, CIFAR-10 with ``--data-dir DIR``); weight 0, the unpenalised model,
is trained once per seed and is the w = 0 point of every curve. With the
final weights it measures on the test split:

* ``test_accuracy``; ``test_accuracy/<attack>@<eps>``: the accuracy under FGSM
  and PGD (L-infinity, ``agp_common.attack_spec``: PGD 10 steps of eps / 4,
  no random start, inputs clipped to the data's valid range, [0, 1] for
  images), computed by the trainer's final evaluation (``--eval-attacks``);
* ``noisy_accuracy@<sigma>``: accuracy with Gaussian noise of standard
  deviation sigma added (one fixed draw shared by all runs, not clipped);
* ``test_grad_norm/<layer>``: the mean over test examples of each example's
  own activation-gradient norm ``||d CE_i / d a_{l,i}||`` (``input``: the
  input gradient that FGSM follows; ``test_grad_median/input`` is their median,
  which a few badly classified examples do not dominate); ``test_grad_rms/<layer>``:
  ``sqrt(mean_i ||d CE_i / d a_{l,i}||^2)``, the square root of the
  per-example penalty's term; ``train_...``: the same on the training split;
* ``test_loss``, ``train_loss``, and ``wall_s`` (the run's training and measuring).

It writes to ``OUT``: ``results.json`` (the sweep's settings, one row per run,
and the summary over seeds), ``results.csv`` (one row per run), ``results.md``
(mean +- standard deviation over seeds per grid point),
``robustness_vs_weight.png`` (clean, attacked and noisy accuracy and the
input-gradient RMS, mean and median against w, one line per layer set,
shaded from the lowest to the highest seed), ``grad_norm_vs_weight.png`` (per-layer gradient sizes), and
``convention.json`` (the size of the seed's batch-mean penalty next to the
loss, at initialisation and after unpenalised training). Each run's own
folder (metrics, config) is ``OUT/runs/<layers>_<normalization>_w<weight>_s<seed>``.

The default grid (3 seeds x (1 + 4 layer sets x 3 weights) = 39 runs of 6
epochs, about 25 s each) took 21.5 minutes on a 2-core CPU shared with other
jobs (load 2.5-4.6); its step times at the quietest moments put it at about
13-14 minutes on that machine alone. Its result: docs/robustness.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agp_common.attack_spec import (
    ATTACKS,
    DEFAULT_EPS,
    DEFAULT_PGD_STEP_RATIO,
    DEFAULT_PGD_STEPS,
    EVAL_ACCURACY_PREFIX,
)
from agp_common.batching import eval_batches, padded_batch, steps_per_epoch
from agp_common.config import OneLineErrorParser, TrainConfig
from agp_common.data import Dataset, load_dataset
from agp_common.errors import NonFiniteError, UsageError, report_error
from agp_common.penalty_spec import INPUT, NORMALIZATIONS
from jax_impl.model import CAPTURE_NAMES, Net
from jax_impl.penalty import penalized_loss
from jax_impl.xla_options import jit_options

#: Penalised layer sets: the input gradient, each capture point, and the answer's pair.
DEFAULT_LAYER_SETS = ((INPUT,), ("relu1",), ("relu2",), ("relu1", "relu2"))
#: Per-example weights (the per-example penalty does not depend on the batch size); 0 is the baseline.
DEFAULT_WEIGHTS = (0.0, 1.0, 3.0, 10.0)
DEFAULT_NORMALIZATIONS = ("per_example",)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_NOISE = (0.2, 0.4)
DEFAULT_EPOCHS = 6
MEASURED_LAYERS = (INPUT, *CAPTURE_NAMES)
NOISE_SEED = 1234
INPUT_NORMS = "input_norms"
#: Label of the unpenalised runs in the ``layers`` and ``normalization`` columns.
NONE = "none"
#: Prefix of the attacked accuracies in a row: ``test_accuracy/fgsm@0.05``.
ATTACKED_PREFIX = "test_accuracy/"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The grid and the shared training settings of a sweep (see ``--help``)."""

    dataset: str = "digits"
    data_dir: str | None = None
    layer_sets: tuple[tuple[str, ...], ...] = DEFAULT_LAYER_SETS
    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    normalizations: tuple[str, ...] = DEFAULT_NORMALIZATIONS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    noise: tuple[float, ...] = DEFAULT_NOISE
    eval_attacks: tuple[str, ...] = ATTACKS
    eval_eps: tuple[float, ...] = DEFAULT_EPS
    eval_pgd_steps: int = DEFAULT_PGD_STEPS
    eval_pgd_step_ratio: float = DEFAULT_PGD_STEP_RATIO
    out: str = "runs/sweep_digits"

    def grid(self) -> list[tuple[int, tuple[str, ...] | None, str, float]]:
        """``(seed, layers, normalization, weight)`` of every run; ``layers=None`` is the w = 0 run."""
        points = []
        for seed in self.seeds:
            if 0.0 in self.weights:
                points.append((seed, None, NONE, 0.0))
            points += [(seed, layers, norm, w) for layers in self.layer_sets for norm in self.normalizations
                       for w in self.weights if w != 0.0]
        return points


def layers_label(layers: tuple[str, ...] | None) -> str:
    """``relu1+relu2``; ``none`` for the unpenalised run."""
    return NONE if layers is None else "+".join(layers)


def run_label(layers: tuple[str, ...] | None, normalization: str, weight: float, seed: int) -> str:
    if layers is None:
        return f"none_w0_s{seed}"
    return f"{layers_label(layers)}_{normalization}_w{weight:g}_s{seed}"


def train_config(sweep: SweepConfig, seed: int, layers: tuple[str, ...] | None, normalization: str,
                 weight: float, workdir: Path, num_train: int) -> TrainConfig:
    """The ``TrainConfig`` of one grid point: quiet, evaluated and checkpointed only at the end."""
    total = sweep.epochs * steps_per_epoch(num_train, sweep.batch_size)
    return TrainConfig(
        dataset=sweep.dataset, data_dir=sweep.data_dir, epochs=sweep.epochs, batch_size=sweep.batch_size,
        optimizer=sweep.optimizer, lr=sweep.lr, penalty_weight=weight, seed=seed, workdir=str(workdir),
        quiet=True, keep_checkpoints=1, eval_every=total, checkpoint_every=total,
        penalty_layers=layers if layers is not None else DEFAULT_LAYER_SETS[-1],
        penalty_normalization=normalization if layers is not None else DEFAULT_NORMALIZATIONS[0],
        eval_attacks=sweep.eval_attacks, eval_eps=sweep.eval_eps, eval_pgd_steps=sweep.eval_pgd_steps,
        eval_pgd_step_ratio=sweep.eval_pgd_step_ratio,
    )


def _batch_measures(params, x, y, mask, noisy_x, *, num_classes: int):
    """Sums over the real rows of one batch: loss, correct (clean, noisy), per-layer ||G_i|| and ||G_i||^2."""
    model = Net(num_classes=num_classes)
    _, aux = penalized_loss(params, model, x, y, penalty_weight=0.0, layers=MEASURED_LAYERS,
                            normalization="per_example", example_weights=mask)
    count = jnp.sum(mask)
    sums = {"loss_sum": aux["loss"] * count}
    for name, g in aux["activation_grads"].items():  # G_i = d CE_i / d a_i, (B, ...)
        sq = jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)  # (B,)
        sums[f"grad_norm/{name}"] = jnp.sum(jnp.sqrt(sq) * mask)
        sums[f"grad_sq/{name}"] = jnp.sum(sq * mask)
        if name == INPUT:
            sums[INPUT_NORMS] = jnp.sqrt(sq)  # (B,): each example's, for the median
    sums["correct"] = jnp.sum((jnp.argmax(aux["logits"], -1) == y) * mask)
    sums["noisy_correct"] = jnp.stack([
        jnp.sum((jnp.argmax(model.apply({"params": params}, xn), -1) == y) * mask) for xn in noisy_x
    ]) if len(noisy_x) else jnp.zeros((0,), mask.dtype)
    sums["count"] = count
    return sums


@functools.cache
def _compiled_batch_measures():
    """``_batch_measures`` under ``jax.jit`` with ``jit_options()`` (built on first use, not at import)."""
    return jax.jit(_batch_measures, static_argnames="num_classes", **jit_options())


def noise_draws(ds: Dataset, sigmas: Sequence[float]) -> np.ndarray:
    """Fixed Gaussian noise (S, N_test, H, W, C), float32, one standard normal draw scaled per sigma."""
    z = np.random.default_rng(NOISE_SEED).standard_normal(ds.x_test.shape).astype(np.float32)
    return np.stack([np.float32(s) * z for s in sigmas]) if sigmas else np.zeros((0, *z.shape), np.float32)


def _split_sums(params, x, y, ds: Dataset, batch_size: int, noise: np.ndarray) -> dict[str, Any]:
    """``_batch_measures`` summed over a whole split (noise (S, N, H, W, C), S may be 0)."""
    totals: dict[str, Any] = {}
    norms = []
    for idx in eval_batches(len(y), batch_size):
        batch = padded_batch(x, y, idx, batch_size, np.float32, ds.pixel_scale)
        pad = ((0, batch_size - len(idx)), (0, 0), (0, 0), (0, 0))
        noisy = np.stack([batch["x"] + np.pad(n[idx], pad) for n in noise]) if len(noise) \
            else np.zeros((0, *batch["x"].shape), np.float32)
        sums = jax.device_get(_compiled_batch_measures()(params, batch["x"], batch["y"], batch["mask"], noisy,
                                                         num_classes=ds.num_classes))
        norms.append(np.asarray(sums.pop(INPUT_NORMS), np.float64)[: len(idx)])  # real rows only
        for k, v in sums.items():
            totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
    totals[INPUT_NORMS] = np.concatenate(norms)  # (N,)
    return totals


def measure(
    params, ds: Dataset, batch_size: int, sigmas: Sequence[float], noise: np.ndarray
) -> dict[str, float]:
    """Test accuracy, accuracy under each noise level, and mean per-example activation-gradient norms.

    Keys ``{test,train}_{accuracy,loss}``, ``{test,train}_grad_rms/<layer>``,
    ``{test,train}_grad_norm/<layer>``, ``{test,train}_grad_median/input`` (see the module
    docstring) and ``noisy_accuracy@<sigma>``.
    """
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    totals = _split_sums(params, ds.x_test, ds.y_test, ds, batch_size, noise)
    out: dict[str, float] = {}
    noisy_correct = totals.pop("noisy_correct")
    train = _split_sums(params, ds.x_train, ds.y_train, ds, batch_size, noise[:0, :0])
    train.pop("noisy_correct")
    for prefix, sums in (("test_", totals), ("train_", train)):
        out[f"{prefix}grad_median/{INPUT}"] = float(np.median(sums.pop(INPUT_NORMS)))
        count = float(sums.pop("count"))
        out[f"{prefix}accuracy"] = float(sums.pop("correct")) / count
        out[f"{prefix}loss"] = float(sums.pop("loss_sum")) / count
        for key, value in sums.items():
            kind, layer = key.split("/")
            if kind == "grad_sq":  # root mean square: sqrt of the per-example penalty's term
                out[f"{prefix}grad_rms/{layer}"] = math.sqrt(float(value) / count)
            else:
                out[f"{prefix}grad_norm/{layer}"] = float(value) / count
    for s, c in zip(sigmas, np.atleast_1d(noisy_correct), strict=False):
        out[f"noisy_accuracy@{s:g}"] = float(c) / len(ds.y_test)
    return out


def convention_numbers(params, ds: Dataset, batch_size: int) -> dict[str, float]:
    """On the first ``batch_size`` training examples: the seed's batch-mean penalty next to the loss.

    ``penalty_batch_mean`` = sum_l ||d loss / d a_l||^2 with the batch-mean loss;
    ``penalty_per_example`` = mean_i sum_l ||d loss_i / d a_{l,i}||^2 (= B x the former);
    ``grad_ratio@w`` = ||grad_theta (w * penalty_batch_mean)|| / ||grad_theta loss||: how much
    of the training step the penalty is at weight w.
    """
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    idx = np.arange(batch_size)
    batch = padded_batch(ds.x_train, ds.y_train, idx, batch_size, np.float32, ds.pixel_scale)
    model = Net(num_classes=ds.num_classes)
    x, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
    _, bm = penalized_loss(params, model, x, y, penalty_weight=1.0)
    _, pe = penalized_loss(params, model, x, y, penalty_weight=1.0, normalization="per_example")
    loss_grad = jax.grad(lambda p: penalized_loss(p, model, x, y, penalty_weight=0.0)[1]["loss"])(params)
    pen_grad = jax.grad(lambda p: penalized_loss(p, model, x, y, penalty_weight=1.0)[1]["penalty"])(params)
    ratio = float(optax.tree.norm(pen_grad) / optax.tree.norm(loss_grad))
    out = {
        "batch_size": batch_size,
        "loss": float(bm["loss"]),
        "penalty_batch_mean": float(bm["penalty"]),
        "penalty_per_example": float(pe["penalty"]),
        "per_example_over_batch_mean": float(pe["penalty"] / bm["penalty"]),
    }
    for w in (1.0, 10.0):
        out[f"grad_ratio@{w:g}"] = w * ratio
    return out


def _log(line: str) -> None:
    print(line, flush=True)  # one line per finished run, visible at once when stdout is a file


def run_sweep(sweep: SweepConfig, *, log=_log) -> list[dict[str, Any]]:
    """Train every grid point (weight 0 once per seed), measure, and return one row per run."""
    out = Path(sweep.out)
    ds = load_dataset(TrainConfig(dataset=sweep.dataset, data_dir=sweep.data_dir))
    noise = noise_draws(ds, sweep.noise)
    from jax_impl.train import init_params, train_and_evaluate  # heavy: imported only when training

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


GROUP_KEYS = ("layers", "normalization", "penalty_weight")
#: Column titles of results.md (the attacked and noisy accuracies are titled by their label).
COLUMN_NAMES = {"test_accuracy": "clean", "test_grad_rms/input": "RMS ‖dCE/dx‖",
                "test_grad_norm/input": "mean ‖dCE/dx‖", "test_grad_median/input": "median ‖dCE/dx‖",
                "train_loss": "train loss", "wall_s": "wall s / run"}
#: The test input-gradient sizes in the table and the figure: RMS (what the per-example penalty
#: on ``input`` minimises, squared), mean and median of ``||d CE_i / d x_i||``.
INPUT_GRADIENT_MEASURES = ("test_grad_rms/input", "test_grad_norm/input", "test_grad_median/input")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per grid point (``GROUP_KEYS``): for every measure, its mean, sd, min and max over the
    seeds that finished (``seeds_ok`` of ``seeds``); sd is the sample standard deviation (0 for one seed)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)
    summary = []
    for key, runs in groups.items():
        ok = [r for r in runs if r.get("status") == "ok"]
        entry: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        entry.update(seeds=len(runs), seeds_ok=len(ok))
        measures = [k for k in (ok[0] if ok else {}) if isinstance(ok[0][k], float) and k not in GROUP_KEYS]
        for k in measures:
            values = np.asarray([r[k] for r in ok if k in r], np.float64)
            sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            entry[k] = {"mean": float(values.mean()), "sd": sd, "min": float(values.min()),
                        "max": float(values.max())}
        summary.append(entry)
    return summary


def _markdown_columns(summary: list[dict[str, Any]]) -> list[str]:
    keys = [k for e in summary for k in e if isinstance(e[k], dict)]
    keys = list(dict.fromkeys(keys))
    ordered = ["test_accuracy"]
    ordered += [k for k in keys if k.startswith(ATTACKED_PREFIX)]
    ordered += [k for k in keys if k.startswith("noisy_accuracy@")]
    ordered += [k for k in (*INPUT_GRADIENT_MEASURES, "train_loss", "wall_s") if k in keys]
    return [k for k in ordered if k in keys]


def write_tables(rows: list[dict[str, Any]], out: Path, sweep: SweepConfig,
                 wall_s: float | None = None) -> None:
    """results.json (settings, rows, summary), results.csv (one row per run), results.md (over seeds)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    (out / "results.json").write_text(json.dumps(
        {"sweep": dataclasses.asdict(sweep), "wall_s": wall_s, "rows": rows, "summary": summary},
        indent=2, default=float) + "\n")
    conv = [r["convention"] for r in rows if "convention" in r]
    if conv:
        (out / "convention.json").write_text(json.dumps(conv[0], indent=2) + "\n")
    cols = list(dict.fromkeys(["layers", "normalization", "penalty_weight", "seed", "status",
                               *(k for r in rows for k in r if k != "convention")]))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    measures = _markdown_columns(summary)
    names = [COLUMN_NAMES.get(m, m.removeprefix(ATTACKED_PREFIX).replace("noisy_accuracy@", "noise "))
             for m in measures]
    lines = ["| layers | normalization | w | seeds | " + " | ".join(names) + " |",
             "|---|---|---:|---:|" + "---:|" * len(measures)]
    for e in summary:
        cells = []
        for m in measures:
            if m not in e:
                cells.append("diverged")
            elif m == "wall_s":
                cells.append(f"{e[m]['mean']:.0f}")
            else:
                sd = f" ± {e[m]['sd']:.3f}" if e["seeds_ok"] > 1 else ""
                cells.append(f"{e[m]['mean']:.3f}{sd}")
        seeds = f"{e['seeds_ok']}" if e["seeds_ok"] == e["seeds"] else f"{e['seeds_ok']} of {e['seeds']}"
        lines.append(f"| {e['layers']} | {e['normalization']} | {e['penalty_weight']:g} | {seeds} | "
                     + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _series(summary: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(layers, normalization) of every penalised curve, in the order of the grid."""
    return list(dict.fromkeys((e["layers"], e["normalization"]) for e in summary if e["layers"] != NONE))


def plot_results(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """``robustness_vs_weight.png`` and ``grad_norm_vs_weight.png``: each measure against w (symlog x
    axis, the unpenalised run at w = 0 starts every curve), one line per layer set (and normalisation)
    through the mean over seeds, shaded from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    base = [e for e in summary if e["layers"] == NONE]
    series = _series(summary)
    several_norms = len({n for _, n in series}) > 1
    positive = sorted({e["penalty_weight"] for e in summary if e["penalty_weight"] > 0}) or [1.0]
    seeds = max((e["seeds"] for e in summary), default=1)

    def draw(ax, key, ylabel, log=False):
        for layers, norm in series:
            pts = sorted((e["penalty_weight"], e[key]) for e in base + [
                e for e in summary if (e["layers"], e["normalization"]) == (layers, norm)] if key in e)
            if not pts:
                continue
            w = [p[0] for p in pts]
            line, = ax.plot(w, [p[1]["mean"] for p in pts], marker="o", ms=4,
                            label=f"{layers}, {norm}" if several_norms else layers)
            ax.fill_between(w, [p[1]["min"] for p in pts], [p[1]["max"] for p in pts], color=line.get_color(),
                            alpha=0.15, lw=0)
        ax.set_xscale("symlog", linthresh=positive[0])
        ax.set_xlim(0, positive[-1] * 1.5)
        ax.set_xticks([0.0, *positive], [f"{w:g}" for w in (0.0, *positive)])
        ax.minorticks_off()
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("penalty weight w (0 = no penalty)")
        ax.set_title(ylabel, fontsize=10)
        ax.grid(True, alpha=0.3)

    def save(fig, axs, used, name, title):
        axs[0].legend(fontsize=8, title="penalised")
        for ax in axs[used:]:
            ax.set_visible(False)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return out / name

    keys = [k for e in summary for k in e if isinstance(e[k], dict)]
    keys = list(dict.fromkeys(keys))
    attacked = [k for k in keys if k.startswith(ATTACKED_PREFIX)]
    noisy = [k for k in keys if k.startswith("noisy_accuracy@")]
    panels = [("test_accuracy", "clean test accuracy", False)]
    panels += [(k, f"accuracy under {k.removeprefix(ATTACKED_PREFIX).replace('@', ', eps = ')}", False)
               for k in attacked]
    panels += [(k, f"accuracy, Gaussian noise sigma = {k.split('@')[1]}", False) for k in noisy]
    panels += [(k, f"{COLUMN_NAMES[k]} over test examples", True) for k in INPUT_GRADIENT_MEASURES]
    panels_used = [p for p in panels if p[0] in keys]
    ncols = 4
    nrows = max(1, math.ceil(len(panels_used) / ncols))
    fig, axs = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.5 * nrows), squeeze=False)
    axs = axs.ravel()
    for ax, (key, title, log) in zip(axs, panels_used, strict=False):
        draw(ax, key, title, log)
    paths = [save(fig, axs, len(panels_used), "robustness_vs_weight.png",
                  f"mean over {seeds} seed(s), band: lowest to highest seed")]

    grad_keys = [k for k in keys if k.startswith("test_grad_rms/")]
    n = max(len(grad_keys), 1)
    fig, axs = plt.subplots(1, n, figsize=(4.6 * n, 3.5), squeeze=False)
    axs = axs.ravel()
    for ax, key in zip(axs, grad_keys, strict=False):
        draw(ax, key, f"RMS over test examples of ||dCE_i/da_i||, {key.split('/')[1]}", log=True)
    paths.append(save(fig, axs, len(grad_keys), "grad_norm_vs_weight.png",
                      "per-example activation-gradient size"))
    return paths


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0,1,10, got {text!r}") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {text!r}")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, got {text!r}")
    return values


def _normalizations(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in NORMALIZATIONS]
    if bad or not values:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {list(NORMALIZATIONS)}, got {text!r}")
    return values


def _layer_sets(text: str) -> tuple[tuple[str, ...], ...]:
    sets = tuple(tuple(n.strip() for n in item.split("+")) for item in text.split(",") if item.strip())
    bad = sorted({n for s in sets for n in s if n not in MEASURED_LAYERS})
    if bad or not sets or len(set(sets)) != len(sets):
        raise argparse.ArgumentTypeError(
            f"expected distinct layer sets such as input,relu1,relu1+relu2 from {list(MEASURED_LAYERS)}, "
            f"got {text!r}")
    return sets


def build_parser() -> argparse.ArgumentParser:
    from agp_common.config import _names  # the training CLI's own reading of the --eval-* lists

    d = SweepConfig()
    p = OneLineErrorParser(
        prog="python -m jax_impl.sweep",
        description="Train the seed CNN for every seed x penalised layer set x normalisation x weight; "
                    "measure clean accuracy, accuracy under FGSM and PGD and under Gaussian noise, and "
                    "gradient sizes; write tables (md, csv, json) and plots against the weight.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=("digits", "cifar10", "npz"), default=None,
                   help="training data (default: digits, or cifar10 when --data-dir is given)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (or .npz with --dataset npz)")
    p.add_argument("--layers", type=_layer_sets, default=d.layer_sets,
                   help="comma-separated penalised layer sets, layers within a set joined by '+' "
                        "(input, relu1, relu2)")
    p.add_argument("--weights", type=_floats, default=d.weights,
                   help="comma-separated penalty weights (0: the unpenalised run, once per seed)")
    p.add_argument("--normalizations", type=_normalizations, default=d.normalizations,
                   help="comma-separated normalisations: batch_mean (the seed's) and/or per_example")
    p.add_argument("--seeds", "--seed", type=_ints, default=d.seeds,
                   help="comma-separated seeds of weights and batch order; every grid point runs once "
                        "per seed")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs per run")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size of every run")
    p.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default=d.optimizer, help="optimizer")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument("--noise", type=_floats, default=d.noise,
                   help="standard deviations of the Gaussian input noise for the noisy accuracy")
    p.add_argument("--eval-attacks", type=_names, default=d.eval_attacks,
                   help="comma-separated attacks (fgsm, pgd); '' for none")
    p.add_argument("--eval-eps", type=_floats, default=d.eval_eps,
                   help="comma-separated L-infinity radii, in units of the scaled data ([0, 1] for images)")
    p.add_argument("--eval-pgd-steps", type=int, default=d.eval_pgd_steps,
                   help="PGD's steps (no random start)")
    p.add_argument("--eval-pgd-step-ratio", type=float, default=d.eval_pgd_step_ratio,
                   help="PGD's step size as a fraction of eps")
    p.add_argument("--out", default=None, help="output folder (default runs/sweep_DATASET)")
    return p


def parse_sweep(argv: Sequence[str] | None) -> SweepConfig:
    """Flags -> ``SweepConfig``; argparse exits 2 on malformed flags, ``UsageError`` for invalid values."""
    args = build_parser().parse_args(argv)
    dataset = args.dataset or ("cifar10" if args.data_dir else "digits")
    if args.epochs < 1 or args.batch_size < 1:
        raise UsageError(f"--epochs and --batch-size must be >= 1, got {args.epochs} and {args.batch_size}")
    if not args.weights:
        raise UsageError("--weights is empty; give at least one penalty weight")
    sweep = SweepConfig(
        dataset=dataset, data_dir=args.data_dir, layer_sets=args.layers, weights=args.weights,
        normalizations=args.normalizations, seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, noise=args.noise, eval_attacks=args.eval_attacks,
        eval_eps=args.eval_eps, eval_pgd_steps=args.eval_pgd_steps,
        eval_pgd_step_ratio=args.eval_pgd_step_ratio,
        out=args.out or f"runs/sweep_{dataset}",
    )
    train_config(sweep, 0, None, NONE, 0.0, Path(sweep.out), 1).attacks()  # UsageError naming --eval-*
    return sweep


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, run the grid, write tables and plots; usage errors are one line and exit 2."""
    try:
        sweep = parse_sweep(argv)
        t0 = time.perf_counter()
        rows = run_sweep(sweep)
        wall = time.perf_counter() - t0
        out = Path(sweep.out)
        write_tables(rows, out, sweep, wall)
        plot_results(rows, out)
    except UsageError as e:
        return report_error(e)
    print(f"sweep: {len(rows)} runs in {wall:.0f} s; table {out / 'results.md'}, "
          f"figure {out / 'robustness_vs_weight.png'}")
    print((out / "results.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
