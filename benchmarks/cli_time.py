"""``python -m benchmarks.step_time --cli``: time the two training CLIs as a user runs them.

Runs ``python -m jax_impl.train`` and ``python -m torch_ref.train`` as
subprocesses (through their command line only) on the same synthetic data
(``--dataset synthetic``, 512 images of 32x32x3, SGD, ``w = 10``) for
``--cli-steps`` steps at each batch size (default 32 and 128), alternating
frameworks for ``--repeats`` rounds (default 1), and reports the median of the
``step_time_s`` of their metrics.jsonl over the steps after ``--cli-warmup``:
the whole training step as a user of the CLI gets it (batch preparation,
transfer, logging included). Beside each CLI, its bare compiled step at the
same batch, timed in this process between the CLI runs (``bare_runner``: JAX
``jax+opts`` penalised, compiled with ``jit_options()`` as the trainer is;
PyTorch eager penalised), and the ratio CLI / bare: what the CLI adds to its
step (goal: at most 1.15). Each ``--cli-jax-flags FLAGS`` adds a column
``jax[FLAGS]``: the JAX CLI with those flags (e.g. ``--conv-impl canonical``,
``--cpu-devices 1``), in the same alternation. The machine report
(``benchmarks.machine``) is printed first and stored in the JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from benchmarks.machine import format_machine, host_memory_setting, machine_report, record_end_load
from benchmarks.step_runners import Runner, import_torch, jax_runner, torch_runner
from benchmarks.timing import time_block

CLI_BATCH_SIZES = (32, 128)
#: The CLIs' data: ``--dataset synthetic``, N,H,W,C (plus N/5 test images).
CLI_SYNTHETIC_SHAPE = "512,32,32,3"
CLI_MODULES = {"jax": "jax_impl.train", "torch": "torch_ref.train"}
#: Bare-step timing blocks after each CLI run, and the shortest block (ms): between the CLI runs, so
#: the CLI and its bare step see the same load.
BARE_BLOCKS_PER_RUN, BARE_MIN_BLOCK_MS = 3, 500.0


def cli_command(framework: str, batch_size: int, steps: int, workdir: Path, *, penalty_weight: float,
                lr: float, seed: int, extra: Sequence[str] = ()) -> list[str]:
    """``python -m <trainer>`` on the shared synthetic data with SGD, evaluated and checkpointed only at
    the end, quiet; ``extra`` flags last."""
    return [sys.executable, "-m", CLI_MODULES[framework], *extra, "--dataset", "synthetic",
            "--synthetic-shape", CLI_SYNTHETIC_SHAPE, "--optimizer", "sgd", "--lr", repr(lr),
            "--penalty-weight", repr(penalty_weight), "--batch-size", str(batch_size), "--steps", str(steps),
            "--eval-every", str(steps), "--checkpoint-every", str(steps), "--seed", str(seed), "--quiet",
            "--workdir", str(workdir)]


def cli_step_times(workdir: Path, warmup: int) -> list[float]:
    """``step_time_s`` of WORKDIR/metrics.jsonl's train records after step ``warmup``, in ms."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] * 1e3 for r in records if r["split"] == "train" and r["step"] > warmup]


class CliVariant(NamedTuple):
    """One column of ``--cli``: a name, the CLI's framework and its extra flags."""

    name: str
    framework: str
    flags: tuple[str, ...] = ()


def cli_variants(frameworks: Sequence[str], jax_flag_sets: Sequence[str]) -> list[CliVariant]:
    """``jax`` (default flags), ``jax[FLAGS]`` per ``--cli-jax-flags``, then ``torch``."""
    variants = [CliVariant(fw, fw) for fw in frameworks if fw == "jax"]
    if "jax" in frameworks:
        variants += [CliVariant(f"jax[{flags}]", "jax", tuple(flags.split())) for flags in jax_flag_sets]
    return variants + [CliVariant(fw, fw) for fw in frameworks if fw == "torch"]


def bare_runner(framework: str, batch_size: int, *, penalty_weight: float, lr: float, seed: int
                ) -> Runner | None:
    """The step a CLI runs, bare, at ``batch_size`` (a fixed batch, SGD): JAX ``jax+opts`` penalised (the
    default ``Net`` under ``jit_options()``, as the trainer compiles it), PyTorch eager penalised on the
    CPU; None for PyTorch when it is not installed."""
    common = dict(batch_size=batch_size, penalised=True, penalty_weight=penalty_weight, lr=lr, seed=seed)
    if framework == "jax":
        return jax_runner(**common, options=True)
    torch = import_torch()
    return None if torch is None else torch_runner(torch, **common, device="cpu")


def calibrated_steps(runner: Runner, min_block_ms: float, warmup: int = 2) -> int:
    """Warm ``runner`` up (compilation), then the steps of a block of at least ``min_block_ms``."""
    for _ in range(warmup):
        runner.run()
    once = time_block(runner.run, 1)
    return max(1, int(np.ceil(min_block_ms / 1e3 / max(once, 1e-6))))


def run_clis(variants: Sequence[CliVariant], batch_sizes: Sequence[int], steps: int, warmup: int,
             rounds: int, *, bare: bool = True, **flags: Any) -> list[dict[str, Any]]:
    """Per batch size: each CLI variant's median ``step_time_s`` (ms) after ``warmup``, torch over
    each JAX variant (``torch_over_jax``, ``torch_over_jax[FLAGS]``), and with ``bare`` each
    framework's bare step (``jax_bare_ms``, ``torch_bare_ms``: the median of ``BARE_BLOCKS_PER_RUN``
    blocks after every CLI run of that framework) and each variant over it (``jax_over_bare``, ...).

    The variants alternate run by run (the order flips every round), each run in a fresh workdir.
    ``flags``: ``cli_command``'s ``penalty_weight``, ``lr``, ``seed`` (the bare steps use them too).
    """
    rows = []
    for b in batch_sizes:
        samples: dict[str, list[float]] = {v.name: [] for v in variants}
        runners: dict[str, tuple[Runner, int]] = {}
        if bare:
            for fw in dict.fromkeys(v.framework for v in variants):
                runner = bare_runner(fw, b, **flags)
                if runner is not None:
                    runners[fw] = (runner, calibrated_steps(runner, BARE_MIN_BLOCK_MS))
        bare_ms: dict[str, list[float]] = {fw: [] for fw in runners}
        for r in range(rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                with tempfile.TemporaryDirectory() as tmp:
                    command = cli_command(v.framework, b, steps, Path(tmp) / "run", extra=v.flags, **flags)
                    proc = subprocess.run(command, capture_output=True, text=True)
                    if proc.returncode:
                        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: "
                                           f"{proc.stderr[-2000:]}")
                    samples[v.name] += cli_step_times(Path(tmp) / "run", warmup)
                if v.framework in runners:
                    runner, n = runners[v.framework]
                    bare_ms[v.framework] += [time_block(runner.run, n) * 1e3
                                             for _ in range(BARE_BLOCKS_PER_RUN)]
        row: dict[str, Any] = {"batch_size": b, "steps": steps, "warmup": warmup, "rounds": rounds}
        for name, ms in samples.items():
            row[f"{name}_ms"] = float(np.median(ms))
            row[f"{name}_examples_per_s"] = b / (row[f"{name}_ms"] / 1e3)
        for fw, ms in bare_ms.items():
            row[f"{fw}_bare_ms"] = float(np.median(ms))
        for v in variants:
            if v.framework == "jax" and "torch_ms" in row:
                row[f"torch_over_{v.name}"] = row["torch_ms"] / row[f"{v.name}_ms"]
            if f"{v.framework}_bare_ms" in row:
                row[f"{v.name}_over_bare"] = row[f"{v.name}_ms"] / row[f"{v.framework}_bare_ms"]
        rows.append(row)
        times = ", ".join(f"{v.name} {row[f'{v.name}_ms']:.2f} ms" for v in variants)
        bares = ", ".join(f"{fw} bare {row[f'{fw}_bare_ms']:.2f} ms" for fw in bare_ms)
        print(f"  batch {b:4d} CLIs: {times}" + (f"; {bares}" if bares else ""), flush=True)
    return rows


def format_cli_table(rows: Sequence[dict[str, Any]], variants: Sequence[CliVariant]) -> str:
    """Markdown: one row per batch size; per framework its bare step, then each CLI variant's median step
    time and its ratio to that bare step (CLI/bare); then torch/jax of the CLIs."""
    ratios = [v.name for v in variants if v.framework == "jax" and any(v2.framework == "torch"
                                                                        for v2 in variants)]
    columns: list[tuple[str, str, str]] = []  # (header, key, format)
    for fw in dict.fromkeys(v.framework for v in variants):
        if any(f"{fw}_bare_ms" in row for row in rows):
            columns.append((f"{fw} bare step ms", f"{fw}_bare_ms", ".2f"))
        for v in variants:
            if v.framework == fw:
                columns.append((f"{v.name} CLI ms/step", f"{v.name}_ms", ".2f"))
                if any(f"{v.name}_over_bare" in row for row in rows):
                    columns.append((f"{v.name} CLI/bare", f"{v.name}_over_bare", ".3f"))
    columns += [(f"torch/{n}", f"torch_over_{n}", ".2f") for n in ratios]
    header = ["batch", *(c[0] for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in rows:
        cells = [str(row["batch_size"]), *(format(row[key], fmt) if key in row else "n/a"
                                           for _, key, fmt in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cli_main(args: argparse.Namespace) -> int:
    """``--cli``: run both training CLIs, print their step times side by side, write JSON (``--out``).

    ``args``: ``python -m benchmarks.step_time``'s flags (``frameworks``, ``batch_sizes``, ``repeats``,
    ``cli_steps``, ``cli_warmup``, ``cli_jax_flags``, ``penalty_weight``, ``lr``, ``seed``,
    ``out``).
    """
    frameworks = [fw for fw in ("jax", "torch") if fw in args.frameworks]
    torch = import_torch() if "torch" in frameworks else None  # the bare PyTorch step runs in this process
    env = machine_report(jax=jax, torch=torch, torch_device="cpu")
    env.update(host_memory_setting(args.default_malloc))  # the bare steps; the CLIs set it themselves
    env["synthetic_shape"] = CLI_SYNTHETIC_SHAPE
    print(format_machine(env), flush=True)
    print(f"training CLIs {', '.join(frameworks)}", flush=True)
    variants = cli_variants(frameworks, args.cli_jax_flags)
    rows = run_clis(variants, args.batch_sizes or CLI_BATCH_SIZES, args.cli_steps, args.cli_warmup,
                    args.repeats or 1, penalty_weight=args.penalty_weight, lr=args.lr, seed=args.seed)
    print()
    print(format_cli_table(rows, variants))
    print(record_end_load(env))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": env, "cli": rows}, indent=2))
        print(f"\nwrote {args.out}")
    return 0
