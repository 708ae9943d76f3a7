"""``python -m jax_impl.sweep``: what the penalty does, over a grid of weights and normalisations.

For every (penalty weight, normalisation) pair it trains the seed CNN with
``jax_impl.train.train_and_evaluate`` (digits by default, CIFAR-10 with
``--dataset cifar10 --data-dir DIR``), then measures on the test split:

* ``test_grad_rms/<layer>``: ``sqrt(mean_i ||d CE_i / d a_{l,i}||^2)`` over the
  test examples, each example's own activation gradient (layers ``input``,
  ``relu1``, ``relu2``): the square root of the per-example penalty's term,
  in a unit independent of the batch size; ``test_grad_norm/<layer>`` is the
  plain mean of the norms; ``train_...``: the same on the training split,
  which the penalty was applied to;
* ``test_loss``, ``train_loss`` (full splits, final weights);
* ``test_accuracy`` and ``noisy_accuracy@<sigma>``: accuracy on the test
  images plus Gaussian noise of standard deviation sigma (pixels in [0, 1];
  one fixed noise draw shared by all runs).

It writes ``OUT/results.{json,csv,md}`` (one row per run) and
``OUT/{grad_norm,accuracy,noisy_accuracy}_vs_weight.png``, plus
``OUT/convention.json``: the size of the seed's batch-mean penalty next to
the loss, at initialisation and after unpenalised training (why weight 1 or
10 may show no effect). Each run's own folder
(metrics, config) is ``OUT/runs/<normalization>_w<weight>``.

Weight 0 is the same run for every normalisation and is trained once.
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

from agp_common.batching import eval_batches, padded_batch
from agp_common.config import TrainConfig
from agp_common.data import Dataset, load_dataset
from agp_common.errors import NonFiniteError, UsageError, report_error
from agp_common.penalty_spec import INPUT, NORMALIZATIONS
from jax_impl.model import CAPTURE_NAMES, Net
from jax_impl.penalty import penalized_loss

DEFAULT_WEIGHTS = (0.0, 1.0, 10.0, 100.0, 1000.0)
DEFAULT_NOISE = (0.2, 0.4)
DEFAULT_EPOCHS = 10
MEASURED_LAYERS = (INPUT, *CAPTURE_NAMES)
NOISE_SEED = 1234


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The grid and the shared training settings of a sweep (see ``--help``)."""

    dataset: str = "digits"
    data_dir: str | None = None
    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    normalizations: tuple[str, ...] = NORMALIZATIONS
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    seed: int = 0
    noise: tuple[float, ...] = DEFAULT_NOISE
    out: str = "runs/sweep_digits"


def train_config(sweep: SweepConfig, weight: float, normalization: str, workdir: Path) -> TrainConfig:
    """The ``TrainConfig`` of one grid point (quiet, no checkpoints kept beyond the last)."""
    return TrainConfig(
        dataset=sweep.dataset, data_dir=sweep.data_dir, epochs=sweep.epochs, batch_size=sweep.batch_size,
        optimizer=sweep.optimizer, lr=sweep.lr, penalty_weight=weight, seed=sweep.seed,
        workdir=str(workdir), quiet=True, keep_checkpoints=1, penalty_normalization=normalization,
    )


@functools.partial(jax.jit, static_argnames="num_classes")
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
    sums["correct"] = jnp.sum((jnp.argmax(aux["logits"], -1) == y) * mask)
    sums["noisy_correct"] = jnp.stack([
        jnp.sum((jnp.argmax(model.apply({"params": params}, xn), -1) == y) * mask) for xn in noisy_x
    ]) if len(noisy_x) else jnp.zeros((0,), mask.dtype)
    sums["count"] = count
    return sums


def noise_draws(ds: Dataset, sigmas: Sequence[float]) -> np.ndarray:
    """Fixed Gaussian noise (S, N_test, H, W, C), float32, one standard normal draw scaled per sigma."""
    z = np.random.default_rng(NOISE_SEED).standard_normal(ds.x_test.shape).astype(np.float32)
    return np.stack([np.float32(s) * z for s in sigmas]) if sigmas else np.zeros((0, *z.shape), np.float32)


def _split_sums(params, x, y, ds: Dataset, batch_size: int, noise: np.ndarray) -> dict[str, Any]:
    """``_batch_measures`` summed over a whole split (noise (S, N, H, W, C), S may be 0)."""
    totals: dict[str, Any] = {}
    for idx in eval_batches(len(y), batch_size):
        batch = padded_batch(x, y, idx, batch_size, np.float32, ds.pixel_scale)
        pad = ((0, batch_size - len(idx)), (0, 0), (0, 0), (0, 0))
        noisy = np.stack([batch["x"] + np.pad(n[idx], pad) for n in noise]) if len(noise) \
            else np.zeros((0, *batch["x"].shape), np.float32)
        sums = jax.device_get(_batch_measures(params, batch["x"], batch["y"], batch["mask"], noisy,
                                              num_classes=ds.num_classes))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
    return totals


def measure(
    params, ds: Dataset, batch_size: int, sigmas: Sequence[float], noise: np.ndarray
) -> dict[str, float]:
    """Test accuracy, accuracy under each noise level, and mean per-example activation-gradient norms.

    Keys ``{test,train}_{accuracy,loss}``, ``{test,train}_grad_rms/<layer>``,
    ``{test,train}_grad_norm/<layer>`` (see the module docstring) and ``noisy_accuracy@<sigma>``.
    """
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    totals = _split_sums(params, ds.x_test, ds.y_test, ds, batch_size, noise)
    out: dict[str, float] = {}
    noisy_correct = totals.pop("noisy_correct")
    train = _split_sums(params, ds.x_train, ds.y_train, ds, batch_size, noise[:0, :0])
    train.pop("noisy_correct")
    for prefix, sums in (("test_", totals), ("train_", train)):
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


def run_label(normalization: str, weight: float) -> str:
    return f"{normalization}_w{weight:g}"


def run_sweep(sweep: SweepConfig, *, log=print) -> list[dict[str, Any]]:
    """Train every grid point (weight 0 once), measure, and return one row per run."""
    out = Path(sweep.out)
    ds = load_dataset(train_config(sweep, 0.0, "batch_mean", out))
    noise = noise_draws(ds, sweep.noise)
    from jax_impl.train import init_params, train_and_evaluate  # heavy: imported only when training

    rows: list[dict[str, Any]] = []
    grid = [(0.0, "batch_mean")] if 0.0 in sweep.weights else []
    grid += [(w, n) for n in sweep.normalizations for w in sweep.weights if w != 0.0]
    for weight, normalization in grid:
        label = "none" if weight == 0.0 else normalization
        workdir = out / "runs" / run_label(label, weight)
        config = train_config(sweep, weight, normalization, workdir)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"normalization": label, "penalty_weight": weight}
        try:
            result = train_and_evaluate(config, workdir, plots=False)
        except NonFiniteError as e:
            row.update({"status": f"diverged: {e}", "wall_s": time.perf_counter() - t0})
            rows.append(row)
            log(f"{label:>11} w={weight:<8g} diverged ({e})")
            continue
        row["status"] = "ok"
        row.update(measure(result.params, ds, sweep.batch_size, sweep.noise, noise))
        row["wall_s"] = time.perf_counter() - t0
        if weight == 0.0:
            initial = init_params(Net(num_classes=ds.num_classes), ds.image_shape, sweep.seed, np.float32)
            row["convention"] = {"at_init": convention_numbers(initial, ds, sweep.batch_size),
                                 "after_training_w0": convention_numbers(result.params, ds, sweep.batch_size)}
        rows.append(row)
        log(f"{label:>11} w={weight:<8g} test acc {row['test_accuracy']:.4f}  "
            + "  ".join(f"{k.split('/')[1]} {row[k]:.3g}" for k in row if k.startswith("test_grad_rms/"))
            + f"  ({row['wall_s']:.0f} s)")
    return rows


TABLE_COLUMNS = ("normalization", "penalty_weight", "status", "test_accuracy")
#: Columns of results.md (results.csv and results.json hold every measure).
MARKDOWN_PREFIXES = ("normalization", "penalty_weight", "test_accuracy", "noisy_accuracy@", "train_loss",
                     "train_grad_rms/", "test_grad_rms/")


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = list(TABLE_COLUMNS)
    for row in rows:
        for k in row:
            if k not in keys and k != "convention":
                keys.append(k)
    return keys


def write_tables(rows: list[dict[str, Any]], out: Path, sweep: SweepConfig) -> None:
    """results.json (with the sweep config), results.csv and results.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"sweep": dataclasses.asdict(sweep), "rows": rows}, indent=2, default=float) + "\n")
    conv = [r["convention"] for r in rows if "convention" in r]
    if conv:
        (out / "convention.json").write_text(json.dumps(conv[0], indent=2) + "\n")
    cols = table_columns(rows)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    md_cols = [c for p in MARKDOWN_PREFIXES for c in cols if c.startswith(p)]
    lines = ["| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    for r in rows:
        cells = [fmt(r.get(c, "")) if r.get("status") == "ok" or c in TABLE_COLUMNS[:2] else "diverged"
                 for c in md_cols]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot_results(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Three PNGs against the penalty weight (symlog x axis; weight 0 is the unpenalised run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    base = [r for r in ok if r["normalization"] == "none"]
    positive = sorted({r["penalty_weight"] for r in ok if r["penalty_weight"] > 0}) or [1.0]
    series = sorted({r["normalization"] for r in ok if r["normalization"] != "none"})

    def curve(norm, key):
        runs = base + [r for r in ok if r["normalization"] == norm]
        pts = sorted((r["penalty_weight"], r[key]) for r in runs if key in r)
        return [p[0] for p in pts], [p[1] for p in pts]

    def axes(ax, ylabel):
        ax.set_xscale("symlog", linthresh=positive[0])
        ax.set_xlim(0, positive[-1] * 2)
        ax.set_xlabel("penalty weight w (0 = no penalty)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)

    paths = []
    grad_keys = [k for k in (ok[0] if ok else {}) if k.startswith("test_grad_rms/")]
    fig, axs = plt.subplots(1, max(len(grad_keys), 1), figsize=(4.2 * max(len(grad_keys), 1), 3.6))
    for ax, key in zip(np.atleast_1d(axs), grad_keys, strict=False):
        for norm in series:
            line, = ax.plot(*curve(norm, key), marker="o", label=f"{norm}, test")
            ax.plot(*curve(norm, key.replace("test_", "train_", 1)), marker="x", ls="--",
                    color=line.get_color(), label=f"{norm}, train")
        ax.set_yscale("log")
        axes(ax, f"RMS over examples of ||d CE_i / d a_i||, {key.split('/')[1]}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "grad_norm_vs_weight.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for norm in series:
        ax.plot(*curve(norm, "test_accuracy"), marker="o", label=norm)
    axes(ax, "test accuracy")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "accuracy_vs_weight.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    noisy_keys = [k for k in (ok[0] if ok else {}) if k.startswith("noisy_accuracy@")]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for norm in series:
        for key in noisy_keys:
            ax.plot(*curve(norm, key), marker="o", label=f"{norm}, sigma={key.split('@')[1]}")
    axes(ax, "test accuracy under Gaussian input noise")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "noisy_accuracy_vs_weight.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
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


def _normalizations(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in NORMALIZATIONS]
    if bad or not values:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {list(NORMALIZATIONS)}, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    d = SweepConfig()
    p = argparse.ArgumentParser(
        prog="python -m jax_impl.sweep",
        description="Train the seed CNN for a grid of penalty weights and normalisations; "
                    "write a table (md, csv, json) and plots of gradient norms and accuracies vs the weight.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=("digits", "cifar10", "npz"), default=None,
                   help="training data (default: digits, or cifar10 when --data-dir is given)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (or .npz with --dataset npz)")
    p.add_argument("--weights", type=_floats, default=d.weights, help="comma-separated penalty weights")
    p.add_argument("--normalizations", type=_normalizations, default=d.normalizations,
                   help="comma-separated normalisations: batch_mean (the seed's) and/or per_example")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs per run")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size of every run")
    p.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default=d.optimizer, help="optimizer")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of weights and batch order (all runs)")
    p.add_argument("--noise", type=_floats, default=d.noise,
                   help="standard deviations of the Gaussian input noise for the robustness accuracy")
    p.add_argument("--out", default=None, help="output folder (default runs/sweep_DATASET)")
    return p


def parse_sweep(argv: Sequence[str] | None) -> SweepConfig:
    args = build_parser().parse_args(argv)
    dataset = args.dataset or ("cifar10" if args.data_dir else "digits")
    if args.epochs < 1 or args.batch_size < 1:
        raise UsageError(f"--epochs and --batch-size must be >= 1, got {args.epochs} and {args.batch_size}")
    if not args.weights:
        raise UsageError("--weights is empty; give at least one penalty weight")
    return SweepConfig(
        dataset=dataset, data_dir=args.data_dir, weights=args.weights, normalizations=args.normalizations,
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, seed=args.seed,
        noise=args.noise, out=args.out or f"runs/sweep_{dataset}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, run the grid, write tables and plots; usage errors are one line and exit 2."""
    try:
        sweep = parse_sweep(argv)
        t0 = time.perf_counter()
        rows = run_sweep(sweep)
        out = Path(sweep.out)
        write_tables(rows, out, sweep)
        plot_results(rows, out)
    except UsageError as e:
        return report_error(e)
    print(f"sweep: {len(rows)} runs in {time.perf_counter() - t0:.0f} s; table {out / 'results.md'}")
    print((out / "results.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
