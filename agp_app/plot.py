"""PNG plots of a run folder's metrics.jsonl (matplotlib, no GUI, no JAX or PyTorch).

``python -m jax_impl.plot WORKDIR`` (or ``python -m agp_app.plot WORKDIR``)
writes, next to metrics.jsonl:

* ``loss.png``: train loss, train total (loss + w * penalty) and test loss; penalty on a log axis;
  per-step train values are drawn faintly under their moving average (~2% of the run);
* ``grad_norms.png``: ||d loss / d a_l|| per capture point (log axis);
* ``accuracy.png``: train accuracy (per step) and test accuracy (clean, and under each attack of
  ``--eval-attacks``).

``python -m jax_impl.plot RUN_A RUN_B ... [--out DIR]`` overlays several runs instead (one colour
per run, labelled by its folder name): ``compare_loss.png`` (train loss, moving average, and test
loss), ``compare_accuracy.png`` (test accuracy) and ``compare_grad_norms.png`` in ``DIR`` (default:
the current folder). Legends sit outside the axes, so they never cover a curve.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from agp_app.errors import UsageError, WriteFailed, report_error, report_signal_stop
from agp_app.interrupts import SignalStop, stop_on_signals
from agp_app.io import JsonLinesError, atomic_write, read_jsonl
from agp_app.runlog import METRICS_FILE, penalty_applied

GRAD_NORM_PREFIX = "act_grad_norm/"


def _series(records, key):
    pairs = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _smooth(xs, ys):
    """Moving average over ~2% of the run (train metrics are per batch and noisy): same x for plotting."""
    import numpy as np

    window = max(1, len(ys) // 50)
    if window == 1:
        return xs, ys
    kernel = np.ones(window) / window
    return xs[window - 1 :], np.convolve(np.asarray(ys, float), kernel, mode="valid")


def _plot_train(ax, xs, ys, label, **kwargs):
    """Raw per-step values, faint, under their moving average."""
    (line,) = ax.plot(xs, ys, lw=0.6, alpha=0.25, **kwargs)
    ax.plot(*_smooth(xs, ys), lw=1.4, label=label, color=line.get_color())


def _save(fig, path: Path) -> None:
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    except OSError as e:
        raise WriteFailed("the plot", path, e) from None


#: Keys (and key prefixes) of the records that the plots draw.
PLOTTED_KEYS = ("loss", "total", "penalty", "accuracy", "eval_loss", "eval_accuracy")
PLOTTED_PREFIXES = (GRAD_NORM_PREFIX, "eval_accuracy/")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_plottable(records: list[dict], path: Path) -> None:
    """``UsageError`` naming the first record whose ``step`` or a plotted value is not a number (a
    damaged or hand-edited log would otherwise be drawn as categories, or half drawn)."""
    for n, record in enumerate(records, 1):
        drawn = [(k, v) for k, v in record.items() if k in PLOTTED_KEYS or k.startswith(PLOTTED_PREFIXES)]
        bad = next(((k, v) for k, v in [("step", record.get("step")), *drawn] if not _is_number(v)), None)
        if bad is not None:
            raise UsageError(f"{path} record {n}: {bad[0]} is {bad[1]!r}, expected a number; repair or "
                             "delete that line")


def load_run(workdir: Path) -> tuple[list[dict], list[dict]]:
    """The train and eval records of ``workdir``'s metrics.jsonl; ``UsageError`` when there are none."""
    path = workdir / METRICS_FILE
    if not path.is_file():
        raise UsageError(f"{path}: not found; expected the metrics.jsonl of a training run")
    try:
        records = list(read_jsonl(path))
    except JsonLinesError as e:
        raise UsageError(f"{e}; repair or delete that line") from None
    except OSError as e:  # a FIFO, a device, too large (read_regular_file)
        raise UsageError(f"{path}: unreadable ({e.strerror or e}); expected the metrics.jsonl of a "
                         "training run") from None
    check_plottable(records, path)
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    if not train:
        raise UsageError(f"{path}: no training records to plot")
    return train, evals


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(8, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _legend(fig, *axes) -> None:
    """One legend for the figure's axes, outside them on the right: it never covers a curve."""
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize="small")


def _penalty_records(train: list[dict]) -> list[dict]:
    """The train records whose penalty was computed: all of them with w = 0 (measured only), else the
    penalty steps (``--penalty-every k`` leaves the others at 0, which a log axis cannot show)."""
    applied = [r for r in train if penalty_applied(r)]
    return applied or train


def _grad_norm_keys(train: list[dict]) -> list[str]:
    return sorted({k for r in train for k in r if k.startswith(GRAD_NORM_PREFIX)})


def _finish(fig, ax, path: Path, title: str, ylabel: str, *legend_axes) -> Path:
    """Label the step axis and ``ax``, title, one legend outside the axes (``ax`` and
    ``legend_axes``), then write the PNG to ``path``; returns ``path``."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(fig, ax, *legend_axes)
    _save(fig, path)
    return path


def plot_run(workdir: str | Path) -> list[Path]:
    """Write the three PNGs for ``workdir``; returns their paths. ``UsageError`` without metrics."""
    workdir = Path(workdir)
    train, evals = load_run(workdir)
    outputs = []
    fig, ax = _figure()
    _plot_train(ax, *_series(train, "loss"), "train loss")
    ax.plot(*_smooth(*_series(train, "total")), lw=1, ls="--", label="train total (loss + w * penalty)")
    if evals:
        ax.plot(*_series(evals, "eval_loss"), "o-", label="test loss")
    ax2 = ax.twinx()
    _plot_train(ax2, *_series(_penalty_records(train), "penalty"), "penalty", color="tab:red")
    ax2.set_yscale("log")
    measured_only = not any(penalty_applied(r) for r in train)  # --penalty-weight 0
    ax2.set_ylabel("penalty sum_l ||dL/da_l||^2" + (" (not applied, w = 0)" if measured_only else ""),
                   color="tab:red")
    outputs.append(_finish(fig, ax, workdir / "loss.png", "loss and penalty", "cross-entropy", ax2))

    fig, ax = _figure()
    for key in _grad_norm_keys(train):
        _plot_train(ax, *_series(train, key), key.removeprefix(GRAD_NORM_PREFIX))
    ax.set_yscale("log")
    outputs.append(_finish(fig, ax, workdir / "grad_norms.png", "activation gradient norm per capture point",
                           "||d loss / d a||"))

    fig, ax = _figure()
    _plot_train(ax, *_series(train, "accuracy"), "train (batch, moving average)")
    if evals:
        ax.plot(*_series(evals, "eval_accuracy"), "o-", label="test")
    for key in sorted({k for r in evals for k in r if k.startswith("eval_accuracy/")}):  # --eval-attacks
        ax.plot(*_series(evals, key), ".--", label=f"test, {key.split('/', 1)[1]}")
    ax.set_ylim(0, 1)
    outputs.append(_finish(fig, ax, workdir / "accuracy.png", "accuracy", "accuracy"))
    return outputs


def plot_runs(workdirs: Sequence[str | Path], out: str | Path = ".") -> list[Path]:
    """Overlay several runs (module docstring): three PNGs in ``out``; returns their paths."""
    runs = [(Path(w).resolve().name or str(w), *load_run(Path(w))) for w in workdirs]
    out = Path(out)
    if not out.is_dir():
        raise UsageError(f"--out {out}: not a folder; create it or name an existing one")
    outputs = []
    fig, ax = _figure()
    for name, train, evals in runs:
        (line,) = ax.plot(*_smooth(*_series(train, "loss")), lw=1.2, label=f"{name}: train loss")
        if evals:
            ax.plot(*_series(evals, "eval_loss"), "o--", color=line.get_color(), label=f"{name}: test loss")
    outputs.append(_finish(fig, ax, out / "compare_loss.png", "loss", "cross-entropy"))

    fig, ax = _figure()
    for name, train, evals in runs:
        if evals:
            ax.plot(*_series(evals, "eval_accuracy"), "o-", label=f"{name}: test")
        else:
            ax.plot(*_smooth(*_series(train, "accuracy")), lw=1.2, label=f"{name}: train (moving average)")
    ax.set_ylim(0, 1)
    outputs.append(_finish(fig, ax, out / "compare_accuracy.png", "accuracy", "accuracy"))

    fig, ax = _figure()
    for name, train, _ in runs:
        for key in _grad_norm_keys(train):
            ax.plot(*_smooth(*_series(train, key)), lw=1.2,
                    label=f"{name}: {key.removeprefix(GRAD_NORM_PREFIX)}")
    ax.set_yscale("log")
    outputs.append(_finish(fig, ax, out / "compare_grad_norms.png",
                           "activation gradient norm per capture point", "||d loss / d a||"))
    return outputs


def main(argv: Sequence[str] | None = None, prog: str = "python -m agp_app.plot") -> int:
    """CLI: plot WORKDIR's metrics.jsonl, or overlay several runs; exit 2 with one line on a usage error."""
    parser = argparse.ArgumentParser(prog=prog, description="Plot a run folder's metrics.jsonl as PNGs, "
                                     "or overlay several runs.")
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                        help="run folder(s) written by jax_impl.train or torch_ref.train; with several, "
                             "their curves are overlaid")
    parser.add_argument("--out", default=".", help="folder for the overlay PNGs (several runs; default .)")
    args = parser.parse_args(argv)
    try:
        with stop_on_signals():
            runs = args.workdirs
            paths = plot_run(runs[0]) if len(runs) == 1 else plot_runs(runs, args.out)
            for path in paths:
                print(path)
    except (UsageError, WriteFailed) as e:
        return report_error(e)
    except SignalStop as e:  # the plots already written are whole; the one being drawn is not there
        return report_signal_stop(e.signum)
    return 0


if __name__ == "__main__":
    sys.exit(main())
