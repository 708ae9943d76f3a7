"""Time one SGD step of the seed's CNN in JAX and in PyTorch, side by side, in one process.

Usage::

    python -m benchmarks.step_time                      # batch 1, 32, 128; table + JSON
    python -m benchmarks.step_time --batch-sizes 8 64 --out results.json
    python -m benchmarks.step_time --sweep --plot sweep.png   # batch 1..512, plot
    python -m benchmarks.step_time --cli                # the two training CLIs, batch 32 and 128
    python -m benchmarks.step_time --cli --cli-jax-flags='--conv-impl canonical'   # plus a JAX CLI variant
    python -m benchmarks.step_time --torch-variants eager cuda-graph compile   # PyTorch's faster modes

Every run first prints the machine (``benchmarks.machine``: CPU model, cores,
ISA, memory, load, versions, JAX's backend and what ``conv_impl="auto"`` runs)
and stores it in the JSON (``--out``) under ``"environment"``; a line warns
when the machine was busy (1-minute load above 0.5 per core) and its numbers
are not to be trusted.

The tool's parts, one job per module:

* ``benchmarks.step_runners``: the steps timed (JAX penalised and plain, with
  and without ``jit_options()``, per ``--jax-conv-impls``; PyTorch eager and
  its ``--torch-variants``), their analytic FLOP count and peak memory;
* ``benchmarks.timing``: interleaved timing rounds, medians, the torch/jax
  ratios and penalty overheads, the tables and the ``--sweep`` plot;
* ``benchmarks.cli_time``: ``--cli``, the two training CLIs as subprocesses;
* ``benchmarks.machine``: the machine report.

PyTorch keeps its default thread count (``torch.get_num_threads()``, recorded
in the JSON); XLA uses all cores. This module imports both JAX and PyTorch
(cross-framework code, like ``parity_tests``); without PyTorch it times JAX only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jax

from benchmarks.cli_time import (
    CLI_BATCH_SIZES,
    CLI_MODULES,
    CLI_SYNTHETIC_SHAPE,
    CliVariant,
    cli_command,
    cli_main,
    cli_step_times,
    cli_variants,
    format_cli_table,
    run_clis,
)
from benchmarks.machine import format_machine, host_memory_setting, machine_report, record_end_load
from benchmarks.step_runners import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    TORCH_VARIANTS,
    Runner,
    VariantUnavailable,
    forward_flops,
    import_torch,
    jax_runner,
    make_batch,
    make_jax_step,
    step_flops,
    torch_runner,
    torch_runners,
    xla_peak_bytes,
)
from benchmarks.timing import MIB, Result, format_table, measure, plot_sweep, summarise
from jax_impl.conv_impl import CONV_IMPLS

#: This module's own names, and those of the modules it was split into (their old home: the tests and
#: scripts that import them from here keep working).
__all__ = [
    "CLI_BATCH_SIZES", "CLI_MODULES", "CLI_SYNTHETIC_SHAPE", "DEFAULT_BATCH_SIZES", "IMAGE_SHAPE", "MIB",
    "NUM_CLASSES", "SWEEP_BATCH_SIZES", "TORCH_VARIANTS", "CliVariant", "Result", "Runner",
    "VariantUnavailable", "batch_runners", "cli_command", "cli_main", "cli_step_times", "cli_variants",
    "environment", "format_cli_table", "format_table", "forward_flops", "import_torch", "jax_runner",
    "main", "make_batch", "make_jax_step", "measure", "parse_args", "plot_sweep", "run_clis", "step_flops",
    "summarise", "torch_runner", "torch_runners", "xla_peak_bytes",
]

DEFAULT_BATCH_SIZES = (1, 32, 128)
SWEEP_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def environment(torch, torch_device: str) -> dict[str, Any]:
    """The machine report (``benchmarks.machine``) and the dtype, recorded next to the numbers."""
    return {**machine_report(jax=jax, torch=torch, torch_device=torch_device), "dtype": "float32"}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_time",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=None,
                        help=f"batch sizes (default {list(DEFAULT_BATCH_SIZES)}; with --sweep "
                             f"{list(SWEEP_BATCH_SIZES)})")
    parser.add_argument("--sweep", action="store_true", help="sweep batch sizes 1..512 and plot (--plot)")
    parser.add_argument("--plot", type=Path, default=Path("step_time_sweep.png"),
                        help="PNG written in --sweep mode (default step_time_sweep.png)")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed rounds per config (default 15; 5 with --sweep)")
    parser.add_argument("--warmup", type=positive_int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--min-block-ms", type=float, default=50.0,
                        help="each timed block runs consecutive steps for at least this long (default 50)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave malloc's defaults (else freed memory is kept for the next step, as the "
                             "training CLIs do: agp_common.host_memory)")
    parser.add_argument("--penalty-weight", type=float, default=10.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frameworks", nargs="+", choices=("jax", "torch"), default=["jax", "torch"])
    parser.add_argument("--torch-device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--torch-variants", nargs="+", default=["eager"], choices=tuple(TORCH_VARIANTS),
                        help="how the PyTorch step runs, one row each (default eager): cuda-graph (the "
                             "eager step replayed from a CUDA graph; CUDA only), compile (torch.compile "
                             "per stage; a variant PyTorch cannot run is reported with its error)")
    parser.add_argument("--jax-conv-impls", nargs="*", default=[], choices=CONV_IMPLS,
                        help="also time Net(conv_impl=...) for these impls (rows 'jax[impl]', "
                             "'jax+opts[impl]'); 'onednn' needs python -m jax_impl.onednn_conv build")
    parser.add_argument("--cli", action="store_true",
                        help="time the two training CLIs instead (default batch sizes "
                             f"{list(CLI_BATCH_SIZES)}, --repeats 1)")
    parser.add_argument("--cli-steps", type=positive_int, default=60,
                        help="--cli: steps per run (default 60)")
    parser.add_argument("--cli-warmup", type=int, default=20,
                        help="--cli: steps left out of the median (default 20)")
    parser.add_argument("--cli-jax-flags", action="append", default=[], metavar="FLAGS",
                        help="--cli: also run the JAX CLI with these extra flags, as column jax[FLAGS] "
                             "(repeatable), e.g. --cli-jax-flags='--conv-impl canonical'")
    return parser.parse_args(argv)


def onednn_problem(conv_impls: Sequence[str]) -> str | None:
    """Why ``--jax-conv-impls onednn`` cannot run here (rows named [onednn] must not silently time
    "canonical"), or None."""
    if "onednn" not in conv_impls:
        return None
    from jax_impl import onednn_conv

    if onednn_conv.available():
        return None
    return f"--jax-conv-impls onednn: {onednn_conv.unavailable_reason()} (fix: {onednn_conv.INSTALL_HINT})"


def batch_runners(args: argparse.Namespace, batch_size: int, torch, torch_device: str,
                  unavailable: dict[str, str]) -> list[Runner]:
    """Every configuration timed at one batch size: penalised then plain; JAX's rows, then PyTorch's."""
    runners = []
    for penalised in (True, False):
        common = dict(batch_size=batch_size, penalised=penalised, penalty_weight=args.penalty_weight,
                      lr=args.lr, seed=args.seed)
        if "jax" in args.frameworks:
            for options in (False, True):
                runners.append(jax_runner(**common, options=options))
                runners += [jax_runner(**common, conv_impl=impl, options=options)
                            for impl in args.jax_conv_impls]
        if torch is not None:
            runners += torch_runners(torch, args.torch_variants, unavailable, **common, device=torch_device)
    return runners


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cli:
        return cli_main(args)
    problem = onednn_problem(args.jax_conv_impls)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    batch_sizes = args.batch_sizes or (SWEEP_BATCH_SIZES if args.sweep else DEFAULT_BATCH_SIZES)
    repeats = args.repeats or (5 if args.sweep else 15)
    torch = import_torch() if "torch" in args.frameworks else None
    if "torch" in args.frameworks and torch is None:
        print("PyTorch is not installed: timing JAX only.", file=sys.stderr)
    torch_device = args.torch_device or ("cuda" if torch is not None and torch.cuda.is_available() else "cpu")
    env = {**environment(torch, torch_device), **host_memory_setting(args.default_malloc)}
    print(format_machine(env), flush=True)

    results: list[Result] = []
    unavailable: dict[str, str] = {}  # "torch+compile penalised" -> PyTorch's error
    for b in batch_sizes:
        batch_results = measure(batch_runners(args, b, torch, torch_device, unavailable), repeats,
                                args.warmup, args.min_block_ms)
        results += batch_results
        for r in batch_results:
            print(f"  batch {b:4d} {r.framework:>12s} {r.step:>9s}: {r.median_ms:9.2f} ms "
                  f"(IQR {r.p25_ms:.2f}-{r.p75_ms:.2f})", flush=True)

    end_load = record_end_load(env)
    if jax.default_backend() == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        env["jax_device_peak_mib"] = stats.get("peak_bytes_in_use", 0) / MIB
    summary = summarise(results)
    print()
    print(format_table(results, summary))
    for name, error in unavailable.items():
        print(f"- {name}: not run: {error}")
    print(end_load)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": env, "results": [asdict(r) for r in results], "summary": summary,
                   "unavailable": unavailable,
                   "flops_per_example": {"forward": forward_flops(1), "plain": step_flops(1, False),
                                         "penalised": step_flops(1, True)}}
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.out}")
    if args.sweep:
        plot_sweep(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
