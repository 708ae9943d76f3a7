"""The sweep's figures: each measure against the penalty weight, one line per penalised layer set."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from agp_app.io import atomic_write
from agp_app.sweep.grid import ATTACKED_PREFIX, NONE
from agp_app.sweep.tables import COLUMN_NAMES, INPUT_GRADIENT_MEASURES, summarize


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
        atomic_write(out / name, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
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
