"""The sweep's tables: the summary over seeds, results.json, results.csv and results.md."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from agp_app.io import atomic_write_text
from agp_app.sweep.grid import ATTACKED_PREFIX, SweepConfig, weight_label

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
    """results.json (settings, rows, summary), results.csv (one row per run), results.md (over seeds);
    each written whole or not at all (``atomic_write_text``)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    atomic_write_text(out / "results.json", json.dumps(
        {"sweep": dataclasses.asdict(sweep), "wall_s": wall_s, "rows": rows, "summary": summary},
        indent=2, default=float) + "\n")
    conv = [r["convention"] for r in rows if "convention" in r]
    if conv:
        atomic_write_text(out / "convention.json", json.dumps(conv[0], indent=2) + "\n")
    cols = list(dict.fromkeys(["layers", "normalization", "penalty_weight", "seed", "status",
                               *(k for r in rows for k in r if k != "convention")]))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", table.getvalue())

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
        weight = weight_label(e["penalty_weight"])
        lines.append(f"| {e['layers']} | {e['normalization']} | {weight} | {seeds} | "
                     + " | ".join(cells) + " |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
