"""Timing and reporting of ``Runner``s: interleaved rounds, medians, torch/jax ratios, tables, plots.

Timing (``measure``): ``warmup`` untimed calls first (JAX compiles in the
first); then ``repeats`` rounds, each timing a block of consecutive steps per
runner (block length chosen so that one block lasts >= ``min_block_ms``); the
runners are interleaved round by round (in rotating order) so that load from
other processes hits all of them alike. Each block starts with untimed steps
of its own runner for at least ``SETTLE_MS`` (one step at least): the first
steps after another runner's block share the cores with that runner's idle
threads, which spin before they sleep (PyTorch's OpenMP threads for ~10-20 ms
after each step: a JAX step right after a PyTorch one measured +4-8 ms of its
~20 ms at batch 32 on a 2-core CPU, none after a 20 ms pause), a cost a
program running one framework never pays. One untimed step was not enough at
batch 1 (~1 ms): the JAX row that followed PyTorch in two rounds of three
timed 1.3-1.6 ms, the same program following JAX 1.2 ms.

Reported (``Result``): median ms per step over rounds, the interquartile
range and the minimum, examples/s, the achieved GFLOP/s of the analytic count
(``step_runners.step_flops``) and the peak memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks.step_runners import Runner, step_flops

MIB = 2**20

#: Untimed steps of a runner before each of its timed blocks last at least this long (docstring).
SETTLE_MS = 30.0


@dataclass
class Result:
    """Timing of one configuration, in milliseconds per step."""

    framework: str
    step: str
    batch_size: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    steps_per_block: int
    rounds: int
    examples_per_s: float
    gflops_per_s: float
    peak_mib: float | None
    samples_ms: list[float] = field(repr=False, default_factory=list)


def time_block(run: Callable[[], None], steps: int) -> float:
    """Seconds per step over ``steps`` consecutive calls."""
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - start) / steps


def settle(run: Callable[[], None], ms: float = SETTLE_MS) -> None:
    """Untimed calls of ``run`` (one at least) until ``ms`` milliseconds have passed."""
    end = time.perf_counter() + ms / 1e3
    run()
    while time.perf_counter() < end:
        run()


def measure(runners: Sequence[Runner], repeats: int, warmup: int, min_block_ms: float) -> list[Result]:
    """Warm up, calibrate block lengths, then time all runners interleaved (rotating order)."""
    for runner in runners:
        for _ in range(warmup):
            runner.run()
    steps = []
    for runner in runners:
        once = time_block(runner.run, 1)
        steps.append(max(1, int(np.ceil(min_block_ms / 1e3 / max(once, 1e-6)))))
    samples: list[list[float]] = [[] for _ in runners]
    for r in range(repeats):
        order = list(range(len(runners)))
        order = order[r % len(order):] + order[: r % len(order)]
        for i in order:
            settle(runners[i].run)  # untimed: the previous runner's spinning threads go idle (docstring)
            samples[i].append(time_block(runners[i].run, steps[i]) * 1e3)
    results = []
    for runner, n, ms in zip(runners, steps, samples, strict=True):
        q25, median, q75 = np.percentile(ms, [25, 50, 75])
        peak = runner.peak_bytes()
        results.append(Result(
            framework=runner.framework, step=runner.step, batch_size=runner.batch_size,
            median_ms=float(median), p25_ms=float(q25), p75_ms=float(q75), min_ms=float(min(ms)),
            steps_per_block=n, rounds=repeats,
            examples_per_s=runner.batch_size / (median / 1e3),
            gflops_per_s=step_flops(runner.batch_size, runner.step == "penalised") / (median / 1e3) / 1e9,
            peak_mib=None if peak is None else peak / MIB,
            samples_ms=[float(v) for v in ms],
        ))
    return results


def summarise(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Per batch size: torch/jax time ratios and the penalty overhead (penalised / plain) of each.

    ``torch_over_jax_<step>`` is against the plain ``jax.jit`` rows,
    ``torch_over_jax+opts_<step>`` against the ``jit_options()`` ones, and
    ``torch_over_<fw>_<step>`` against any other JAX row (``jax+opts[onednn]``
    from ``--jax-conv-impls onednn``); ``torch+graph_over_...`` and
    ``torch+compile_over_...`` likewise for the ``--torch-variants`` rows.
    """
    by_key = {(r.batch_size, r.framework, r.step): r.median_ms for r in results}
    rows = []
    for b in sorted({r.batch_size for r in results}):
        row: dict[str, Any] = {"batch_size": b}
        frameworks = sorted({fw for (bb, fw, _) in by_key if bb == b})
        for fw in frameworks:
            pen, plain = by_key.get((b, fw, "penalised")), by_key.get((b, fw, "plain"))
            if pen and plain:
                row[f"{fw}_penalty_overhead"] = pen / plain
        for torch_fw in (fw for fw in frameworks if fw.startswith("torch")):
            for jax_fw in (fw for fw in frameworks if fw.startswith("jax")):
                for step in ("penalised", "plain"):
                    t, j = by_key.get((b, torch_fw, step)), by_key.get((b, jax_fw, step))
                    if t and j:
                        row[f"{torch_fw}_over_{jax_fw}_{step}"] = t / j
        rows.append(row)
    return rows


# ------------------------------------------------------------------------ output


def format_table(results: Sequence[Result], summary: Sequence[dict[str, Any]]) -> str:
    """Markdown tables: one row per config, then one summary row per batch size."""
    lines = [
        "| batch | framework | step | ms/step (median) | IQR ms | min ms | examples/s | GFLOP/s | peak MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        peak = "n/a" if r.peak_mib is None else f"{r.peak_mib:.1f}"
        lines.append(
            f"| {r.batch_size} | {r.framework} | {r.step} | {r.median_ms:.2f} | "
            f"{r.p25_ms:.2f}-{r.p75_ms:.2f} | {r.min_ms:.2f} | {r.examples_per_s:,.0f} | "
            f"{r.gflops_per_s:.1f} | {peak} |")
    lines += ["", "| batch | torch/jax penalised | torch/jax plain | torch/(jax+opts) penalised | "
                  "torch/(jax+opts) plain | jax overhead | jax+opts overhead | torch overhead |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(row, key):
        return f"{row[key]:.2f}" if key in row else "n/a"

    for row in summary:
        lines.append(
            f"| {row['batch_size']} | {cell(row, 'torch_over_jax_penalised')} | "
            f"{cell(row, 'torch_over_jax_plain')} | {cell(row, 'torch_over_jax+opts_penalised')} | "
            f"{cell(row, 'torch_over_jax+opts_plain')} | {cell(row, 'jax_penalty_overhead')} | "
            f"{cell(row, 'jax+opts_penalty_overhead')} | {cell(row, 'torch_penalty_overhead')} |")
    # The rows of --jax-conv-impls and --torch-variants, each against the default of the other side.
    frameworks = {r.framework for r in results}
    pairs = [("torch", fw) for fw in sorted(frameworks) if "[" in fw]
    pairs += [(fw, jax_fw) for fw in sorted(frameworks - {"torch"}) if fw.startswith("torch")
              for jax_fw in ("jax", "jax+opts") if jax_fw in frameworks]
    columns = [(t, j, step) for t, j in pairs for step in ("penalised", "plain")]
    if columns:
        lines += ["", "| batch | " + " | ".join(f"{t}/{j} {step}" for t, j, step in columns) + " |",
                  "|---:|" + "---:|" * len(columns)]
        for row in summary:
            cells = [cell(row, f"{t}_over_{j}_{step}") for t, j, step in columns]
            lines.append(f"| {row['batch_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

def plot_sweep(results: Sequence[Result], path: Path) -> None:
    """Two panels against batch size (log-log): ms per step, and examples per second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_tput) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = sorted({(r.framework, r.step) for r in results})
    for fw, step in series:
        rows = sorted((r for r in results if (r.framework, r.step) == (fw, step)), key=lambda r: r.batch_size)
        b = [r.batch_size for r in rows]
        style = "-" if step == "penalised" else "--"
        ax_time.plot(b, [r.median_ms for r in rows], style, marker="o", ms=3, label=f"{fw} {step}")
        ax_tput.plot(b, [r.examples_per_s for r in rows], style, marker="o", ms=3, label=f"{fw} {step}")
    for ax, label in ((ax_time, "ms per step (median)"), (ax_tput, "examples per second")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle(f"SGD step, float32, {jax.default_backend()} (python -m benchmarks.step_time --sweep)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
