"""``python -m jax_impl.sweep``'s flags and ``main``: parse, run the grid, write tables and figures."""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

from agp_app.errors import REPORTED_ERRORS, UsageError, WriteFailed, report_error, report_signal_stop
from agp_app.flags import OneLineErrorParser, _names
from agp_app.interrupts import SignalStop, stop_on_signals
from agp_app.runlog import check_utf8_path
from agp_app.sweep.figures import plot_results
from agp_app.sweep.grid import MEASURED_LAYERS, NONE, SweepConfig, train_config
from agp_app.sweep.runner import run_sweep
from agp_app.sweep.tables import write_tables
from agp_common.penalty_spec import NORMALIZATIONS


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0,1,10, got {text!r}") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {text!r}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:  # one run (or measure) per value: a repeat would be counted twice as if independent
        raise argparse.ArgumentTypeError(f"expected distinct numbers, got {text!r} "
                                         f"(repeated: {', '.join(map(repr, repeated))})")
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
    if dataset in ("npz", "cifar10") and not args.data_dir:
        what = "the .npz file or a folder holding one" if dataset == "npz" else "the CIFAR-10 folder"
        raise UsageError(f"--dataset {dataset} needs --data-dir ({what})")
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


def prepare_out(out: str) -> Path:
    """The ``--out`` folder, created; ``UsageError`` naming ``--out`` when it cannot be (checked before
    the first run rather than when the first run's folder is made, or the tables are written)."""
    path = Path(out)
    check_utf8_path(path, "--out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {path} cannot be created ({e.strerror or e}); expected a folder you can "
                         "write to") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path} is not a writable folder; expected a folder you can write to")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse, run the grid, write tables and plots; usage errors are one line and exit 2."""
    try:
        with stop_on_signals():  # one line, 128 + signum; a run stopped mid-way starts again on rerun
            sweep = parse_sweep(argv)
            out = prepare_out(sweep.out)
            t0 = time.perf_counter()
            rows = run_sweep(sweep)
            wall = time.perf_counter() - t0
            try:
                write_tables(rows, out, sweep, wall)
                plot_results(rows, out)
            except OSError as e:  # the runs' own folders hold every run: rerunning only measures again
                raise WriteFailed("the sweep's results in", out, e) from None
    except REPORTED_ERRORS as e:
        return report_error(e)
    except SignalStop as e:
        return report_signal_stop(e.signum)
    print(f"sweep: {len(rows)} runs in {wall:.0f} s; table {out / 'results.md'}, "
          f"figure {out / 'robustness_vs_weight.png'}")
    print((out / "results.md").read_text(), end="")
    return 0
