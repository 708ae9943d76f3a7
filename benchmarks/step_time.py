"""Time one SGD step of the seed's CNN in JAX and in PyTorch, side by side, in one process.

Usage::

    python -m benchmarks.step_time                      # batch 1, 32, 128; table + JSON
    python -m benchmarks.step_time --batch-sizes 8 64 --out results.json
    python -m benchmarks.step_time --sweep --plot sweep.png   # batch 1..512, plot
    python -m benchmarks.step_time --cli                # the two training CLIs, batch 32 and 128
    python -m benchmarks.step_time --cli --cli-jax-flags='--conv-impl onednn'   # plus a JAX CLI variant
    python -m benchmarks.step_time --torch-variants eager cuda-graph compile   # PyTorch's faster modes

Six steps (more with ``--torch-variants``) are timed for every batch size (float32, SGD, ``w = 10``):

* ``jax/penalised``: exactly what a user of the public API writes::

      (total, aux), grads = jax.value_and_grad(penalized_loss, has_aux=True)(
          params, Net(), x, y, penalty_weight=w)
      updates, opt_state = optax.sgd(lr).update(grads, opt_state, params)

  under one ``jax.jit`` with the default ``Net()`` (its convolution is picked
  per backend by ``Conv2D(impl="auto")``);
* ``jax+opts/penalised``: the same under ``jax.jit(step, **jit_options())``,
  the XLA options that the project's own compiled steps use
  (``jax_impl.xla_options``);
* ``jax/plain``, ``jax+opts/plain``: the same without the penalty (``cross_entropy_loss``);
* ``torch/penalised``: the seed answer's loop body with ``torch_ref.Net``
  (``autograd.grad(loss, [relu1, relu2], create_graph=True)``,
  ``zero_grad``, ``backward``, ``step``), eager mode;
* ``torch/plain``: ``zero_grad``, cross-entropy ``backward``, ``step``;
* with ``--torch-variants``, the same two PyTorch steps replayed from a CUDA
  graph (``torch+graph``, CUDA only) or over ``torch.compile``d stages
  (``torch+compile``); a variant PyTorch cannot run is printed and recorded
  under ``"unavailable"`` with PyTorch's error instead of a row.

Timing: ``--warmup`` untimed calls first (JAX compiles in the first); then
``--repeats`` rounds, each timing a block of consecutive steps per config
(block length chosen so one block lasts >= ``--min-block-ms``); the four
configs are interleaved round by round (in rotating order) so that load from
other processes hits all of them alike. Every JAX step ends with
``block_until_ready``; on CUDA every torch step ends with
``torch.cuda.synchronize()``. Reported: median ms per step over rounds, the
interquartile range, and the minimum. PyTorch keeps its default thread count
(``torch.get_num_threads()``, recorded in the JSON); XLA uses all cores.

``--cli`` instead runs the two training CLIs, ``python -m jax_impl.train`` and
``python -m torch_ref.train``, as subprocesses on the same synthetic data
(``--dataset synthetic``, 512 images of 32x32x3, SGD, ``w = 10``) for
``--cli-steps`` steps at each batch size (default 32 and 128), alternating
frameworks for ``--repeats`` rounds (default 1), and reports the median of the
``step_time_s`` of their metrics.jsonl over the steps after ``--cli-warmup``:
the whole training step as a user of the CLI gets it (batch preparation,
transfer, logging included). Each ``--cli-jax-flags FLAGS`` adds a column
``jax[FLAGS]``: the JAX CLI with those flags (e.g. ``--conv-impl onednn``,
``--cpu-devices 1``), in the same alternation.

FLOP count (analytic, multiply-accumulates x 2; elementwise ops, pooling and
the softmax are not counted). Per example, forward:

* ``conv1``: 28*28 outputs x 32 channels x (5*5*3) = F1 = 1,881,600 MACs
* ``conv2``: 10*10 outputs x 64 channels x (5*5*32) = F2 = 5,120,000 MACs
* ``linear``: 1600 x 10 = L = 16,000 MACs

so a forward pass is 7.02 M MACs = 14.0 MFLOP. The plain step adds each
layer's weight gradient and the input gradients of ``conv2`` and ``linear``
(the data needs none): 2 F1 + 3 F2 + 3 L = 19.17 M MACs (2.73 forwards).
The penalised step (double backprop) costs: forward (F1 + F2 + L); the inner
backward to ``relu1``/``relu2`` (input gradients only: F2 + L); and the outer
backward, which transposes the forward (F1 + 2 F2 + 2 L) *and* the inner
backward (each input-gradient product is bilinear in its two inputs, so it
costs two products: 2 F2 + 2 L): 2 F1 + 6 F2 + 6 L = 34.58 M MACs per example
(4.93 forwards, 1.80x the plain step). That 1.80 is the penalty overhead one
would see if every product ran at the same speed.

Peak memory (MiB, the step's high-water mark including parameters, optimizer
state and the batch): JAX from XLA's buffer assignment of the compiled step
(``memory_analysis()``: arguments + outputs - aliased + temporaries); PyTorch
on CPU from the profiler's allocation events during one step (running
maximum of live bytes) plus the parameters and the batch; on CUDA both
frameworks also report the device allocator's peak.

This module imports both JAX and PyTorch (it is cross-framework code, like
``parity_tests``). If PyTorch is not installed it times JAX only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_impl import Net, cross_entropy_loss, jit_options, penalized_loss
from jax_impl.conv_impl import CONV_IMPLS, resolve_conv_impl

DEFAULT_BATCH_SIZES = (1, 32, 128)
CLI_BATCH_SIZES = (32, 128)
#: The CLIs' data: ``--dataset synthetic``, N,H,W,C (plus N/5 test images).
CLI_SYNTHETIC_SHAPE = "512,32,32,3"
CLI_MODULES = {"jax": "jax_impl.train", "torch": "torch_ref.train"}
SWEEP_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
IMAGE_SHAPE = (32, 32, 3)  # (H, W, C), the seed's CIFAR-like input
NUM_CLASSES = 10
MIB = 2**20

#: Per-example forward MACs of the seed's Net (see the module docstring).
CONV1_MACS = 28 * 28 * 32 * (5 * 5 * 3)
CONV2_MACS = 10 * 10 * 64 * (5 * 5 * 32)
LINEAR_MACS = 1600 * 10


def step_flops(batch_size: int, penalised: bool) -> int:
    """Analytic FLOPs (2 x MACs) of one training step; see the module docstring."""
    f1, f2, lin = CONV1_MACS, CONV2_MACS, LINEAR_MACS
    macs = 2 * f1 + 6 * f2 + 6 * lin if penalised else 2 * f1 + 3 * f2 + 3 * lin
    return 2 * macs * batch_size


def forward_flops(batch_size: int) -> int:
    """Analytic FLOPs of one forward pass (2 x MACs)."""
    return 2 * (CONV1_MACS + CONV2_MACS + LINEAR_MACS) * batch_size


@dataclass
class Runner:
    """One timed configuration: ``run()`` does one full step and waits for it."""

    framework: str
    step: str
    batch_size: int
    run: Callable[[], None]
    peak_bytes: Callable[[], int | None]


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


def make_batch(batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random NHWC float32 images (B, 32, 32, 3) and integer labels (B,), shared by both frameworks."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, *IMAGE_SHAPE), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32)
    return x, y


# --------------------------------------------------------------------------- JAX


def make_jax_step(model: Net, tx: optax.GradientTransformation, penalised: bool, penalty_weight: float,
                  options: bool = False):
    """The user's step: ``value_and_grad`` of ``penalized_loss`` (or plain CE) + optax update, under
    ``jax.jit`` (with ``**jit_options(conv_impl=model.conv_impl)`` when ``options``)."""

    def step(params, opt_state, x, y):
        if penalised:
            (total, _), grads = jax.value_and_grad(penalized_loss, has_aux=True)(
                params, model, x, y, penalty_weight=penalty_weight)
        else:
            total, grads = jax.value_and_grad(
                lambda p: cross_entropy_loss(model.apply({"params": p}, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, total

    return jax.jit(step, **(jit_options(conv_impl=model.conv_impl) if options else {}))


def xla_peak_bytes(compiled) -> int | None:
    """Bytes live at the high-water mark of a compiled XLA program (None if unknown)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def jax_runner(batch_size: int, penalised: bool, penalty_weight: float, lr: float, seed: int,
               conv_impl: str | None = None, options: bool = False) -> Runner:
    """A JAX runner; ``conv_impl=None`` is the default ``Net()`` (what users get); ``options``:
    compiled with ``jit_options()`` (framework ``jax+opts``)."""
    model = Net() if conv_impl is None else Net(conv_impl=conv_impl)
    x_np, y_np = make_batch(batch_size, seed)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    params = model.init(jax.random.key(seed), x)["params"]
    tx = optax.sgd(lr)
    step = make_jax_step(model, tx, penalised, penalty_weight, options)
    state = {"params": params, "opt_state": tx.init(params)}

    def run() -> None:
        params, opt_state, total = step(state["params"], state["opt_state"], x, y)
        jax.block_until_ready((params, opt_state, total))
        state["params"], state["opt_state"] = params, opt_state

    def peak() -> int | None:
        return xla_peak_bytes(step.lower(state["params"], state["opt_state"], x, y).compile())

    name = ("jax+opts" if options else "jax") + ("" if conv_impl is None else f"[{conv_impl}]")
    return Runner(name, "penalised" if penalised else "plain", batch_size, run, peak)


# ------------------------------------------------------------------------- torch


#: ``--torch-variants``: how the PyTorch step runs (framework names of their rows).
TORCH_VARIANTS = {"eager": "torch", "cuda-graph": "torch+graph", "compile": "torch+compile"}


class VariantUnavailable(Exception):
    """A ``--torch-variants`` variant cannot run here; the message (PyTorch's error) is recorded."""


def torch_setup(torch, batch_size: int, lr: float, seed: int, device: str):
    """``(net, optimizer, x, y)``: ``torch_ref.Net`` from ``seed``, SGD, the shared batch as NCHW."""
    from torch_ref.model import Net as TorchNet

    torch.manual_seed(seed)
    net = TorchNet().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    x_np, y_np = make_batch(batch_size, seed)
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)  # NHWC -> NCHW
    y = torch.from_numpy(y_np).long().to(device)
    return net, optimizer, x, y


def seed_answer_step(torch, net, optimizer, x, y, penalised: bool, penalty_weight: float,
                     forward=None) -> Callable[[], None]:
    """One step of the seed answer's loop body (or the plain step without the penalty).

    ``forward(x) -> (logits, [relu1, relu2])``; default ``net(x)`` and the activations it stores.
    """
    criterion = torch.nn.CrossEntropyLoss()
    if forward is None:
        def forward(inputs):
            output = net(inputs)
            return output, [net.relu1, net.relu2]

    def penalised_step() -> None:
        # The seed answer, verbatim apart from names (only_inputs is deprecated and ignored).
        output, activations = forward(x)
        loss = criterion(output, y)
        grads = torch.autograd.grad(loss, activations, create_graph=True)
        grad_norm = 0
        for grad in grads:
            grad_norm += grad.pow(2).sum()
        optimizer.zero_grad()
        loss = loss + grad_norm * penalty_weight
        loss.backward()
        optimizer.step()

    def plain_step() -> None:
        optimizer.zero_grad()
        criterion(forward(x)[0], y).backward()
        optimizer.step()

    return penalised_step if penalised else plain_step


def compiled_stages(torch, net):
    """``forward(x) -> (logits, [relu1, relu2])`` from three ``torch.compile``d stages of ``net``.

    Compiling ``net`` whole would hide relu1 and relu2 inside one graph node, out of
    ``autograd.grad``'s reach; stage boundaries keep them as autograd tensors.
    """
    import torch.nn.functional as F

    stage1 = torch.compile(lambda x: F.relu(F.max_pool2d(net.conv1(x), 2)))
    stage2 = torch.compile(lambda a: F.relu(F.max_pool2d(net.conv2(a), 2)))
    head = torch.compile(lambda a: net.linear(a.reshape(a.size(0), -1)))

    def forward(x):
        relu1 = stage1(x)
        relu2 = stage2(relu1)
        return head(relu2), [relu1, relu2]

    return forward


def torch_runner(torch, batch_size: int, penalised: bool, penalty_weight: float, lr: float,
                 seed: int, device: str, variant: str = "eager") -> Runner:
    """A PyTorch runner: the seed answer's loop body with ``torch_ref.Net``, run as ``variant``.

    * ``"eager"``: as the answer wrote it.
    * ``"cuda-graph"``: the whole eager step (forward, double backward, SGD update) captured once
      in a CUDA graph and replayed (PyTorch's whole-network capture recipe). CUDA only.
    * ``"compile"``: the same step over :func:`compiled_stages`. The penalised step needs the
      double backward of compiled code; where PyTorch has none, its error is raised as
      :class:`VariantUnavailable` (and recorded by the benchmark).
    """
    if variant not in TORCH_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(TORCH_VARIANTS)}, got {variant!r}")
    cuda = device.startswith("cuda")
    if variant == "cuda-graph" and not cuda:
        raise VariantUnavailable(f"CUDA graphs need a CUDA device (--torch-device is {device})")
    net, optimizer, x, y = torch_setup(torch, batch_size, lr, seed, device)
    forward = compiled_stages(torch, net) if variant == "compile" else None
    one_step = seed_answer_step(torch, net, optimizer, x, y, penalised, penalty_weight, forward)
    if variant == "cuda-graph":
        one_step = capture_cuda_graph(torch, one_step, optimizer)
    elif variant == "compile":
        try:
            one_step()  # compiles; raises where compiled stages have no double backward
        except Exception as error:  # PyTorch's own error is the result
            raise VariantUnavailable(f"{type(error).__name__}: {error}".splitlines()[0]) from error

    def run() -> None:
        one_step()
        if cuda:
            torch.cuda.synchronize()

    def peak() -> int | None:
        resident = sum(p.numel() * p.element_size() for p in net.parameters())
        resident += x.numel() * x.element_size() + y.numel() * y.element_size()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            run()
            return int(torch.cuda.max_memory_allocated())
        return resident + torch_cpu_step_peak(torch, run)

    return Runner(TORCH_VARIANTS[variant], "penalised" if penalised else "plain", batch_size, run, peak)


def torch_runners(torch, variants: Sequence[str], unavailable: dict[str, str], **common: Any) -> list[Runner]:
    """One runner per variant; a variant that cannot run adds its error to ``unavailable`` instead
    (keyed ``"<framework> <step>"``, first error only)."""
    runners = []
    for variant in variants:
        try:
            runners.append(torch_runner(torch, **common, variant=variant))
        except VariantUnavailable as error:
            key = f"{TORCH_VARIANTS[variant]} {'penalised' if common['penalised'] else 'plain'}"
            if key not in unavailable:
                print(f"  {key}: not run: {error}", flush=True)
            unavailable.setdefault(key, str(error))
    return runners


def capture_cuda_graph(torch, one_step: Callable[[], None], optimizer) -> Callable[[], None]:
    """``one_step`` captured in a CUDA graph; returns its replay (PyTorch's whole-network recipe)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (cuDNN autotuning, allocations)
        for _ in range(3):
            one_step()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)  # backward allocates .grad inside the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()
    return graph.replay


def torch_cpu_step_peak(torch, run: Callable[[], None]) -> int:
    """Running maximum of bytes allocated (minus freed) during one ``run()``, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def import_torch():
    """``torch`` or None when it is not installed (the benchmark then times JAX only)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


# ------------------------------------------------------------------------ timing


def time_block(run: Callable[[], None], steps: int) -> float:
    """Seconds per step over ``steps`` consecutive calls."""
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - start) / steps


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


def environment(torch, torch_device: str) -> dict[str, Any]:
    """Versions, devices, threads and load, recorded next to the numbers."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_start": os.getloadavg(),
        "dtype": "float32",
        "conv_impl_auto": str(resolve_conv_impl("auto")),  # what Net() runs here (jax_impl.conv_impl)
    }
    if torch is not None:
        env.update(torch=torch.__version__, torch_device=torch_device,
                   torch_num_threads=torch.get_num_threads())
        if torch_device.startswith("cuda"):
            env["torch_cuda_device"] = torch.cuda.get_device_name()
    return env


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


# ---------------------------------------------------------------- training CLIs


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


def run_clis(variants: Sequence[CliVariant], batch_sizes: Sequence[int], steps: int, warmup: int,
             rounds: int, **flags: Any) -> list[dict[str, Any]]:
    """Per batch size: each CLI variant's median ``step_time_s`` (ms) after ``warmup``, and torch over
    each JAX variant (``torch_over_jax``, ``torch_over_jax[FLAGS]``).

    The variants alternate run by run (the order flips every round), each run in a fresh workdir.
    """
    rows = []
    for b in batch_sizes:
        samples: dict[str, list[float]] = {v.name: [] for v in variants}
        for r in range(rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                with tempfile.TemporaryDirectory() as tmp:
                    command = cli_command(v.framework, b, steps, Path(tmp) / "run", extra=v.flags, **flags)
                    proc = subprocess.run(command, capture_output=True, text=True)
                    if proc.returncode:
                        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: "
                                           f"{proc.stderr[-2000:]}")
                    samples[v.name] += cli_step_times(Path(tmp) / "run", warmup)
        row: dict[str, Any] = {"batch_size": b, "steps": steps, "warmup": warmup, "rounds": rounds}
        for name, ms in samples.items():
            row[f"{name}_ms"] = float(np.median(ms))
            row[f"{name}_examples_per_s"] = b / (row[f"{name}_ms"] / 1e3)
        for v in variants:
            if v.framework == "jax" and "torch_ms" in row:
                row[f"torch_over_{v.name}"] = row["torch_ms"] / row[f"{v.name}_ms"]
        rows.append(row)
        times = ", ".join(f"{v.name} {row[f'{v.name}_ms']:.2f} ms" for v in variants)
        print(f"  batch {b:4d} CLIs: {times}", flush=True)
    return rows


def format_cli_table(rows: Sequence[dict[str, Any]], variants: Sequence[CliVariant]) -> str:
    """Markdown: one row per batch size, the CLI variants' median step times and torch/jax side by side."""
    ratios = [v.name for v in variants if v.framework == "jax" and any(v2.framework == "torch"
                                                                        for v2 in variants)]
    header = ["batch", *(f"{v.name} CLI ms/step" for v in variants), *(f"torch/{n}" for n in ratios)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]

    def cell(row, key):
        return f"{row[key]:.2f}" if key in row else "n/a"

    for row in rows:
        cells = [str(row["batch_size"]), *(cell(row, f"{v.name}_ms") for v in variants),
                 *(cell(row, f"torch_over_{n}") for n in ratios)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------- CLI


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
                             "(repeatable), e.g. --cli-jax-flags='--conv-impl onednn'")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cli:
        return cli_main(args)
    if "onednn" in args.jax_conv_impls:
        from jax_impl import onednn_conv

        if not onednn_conv.available():  # rows named [onednn] must not silently time "canonical"
            print(f"--jax-conv-impls onednn: {onednn_conv.unavailable_reason()} "
                  f"(fix: {onednn_conv.INSTALL_HINT})", file=sys.stderr)
            return 2
    batch_sizes = args.batch_sizes or (SWEEP_BATCH_SIZES if args.sweep else DEFAULT_BATCH_SIZES)
    repeats = args.repeats or (5 if args.sweep else 15)
    torch = import_torch() if "torch" in args.frameworks else None
    if "torch" in args.frameworks and torch is None:
        print("PyTorch is not installed: timing JAX only.", file=sys.stderr)
    torch_device = args.torch_device or ("cuda" if torch is not None and torch.cuda.is_available() else "cpu")
    env = environment(torch, torch_device)
    print(f"jax {env['jax']} on {env['jax_backend']}; "
          + (f"torch {env['torch']} on {torch_device} with {env['torch_num_threads']} threads; "
             if torch is not None else "")
          + f"{env['cpu_count']} CPUs, load {env['loadavg_start'][0]:.2f}", flush=True)

    results: list[Result] = []
    unavailable: dict[str, str] = {}  # "torch+compile penalised" -> PyTorch's error
    for b in batch_sizes:
        runners = []
        for penalised in (True, False):
            common = dict(batch_size=b, penalised=penalised, penalty_weight=args.penalty_weight,
                          lr=args.lr, seed=args.seed)
            if "jax" in args.frameworks:
                for options in (False, True):
                    runners.append(jax_runner(**common, options=options))
                    runners += [jax_runner(**common, conv_impl=impl, options=options)
                                for impl in args.jax_conv_impls]
            if torch is not None:
                runners += torch_runners(torch, args.torch_variants, unavailable, **common,
                                         device=torch_device)
        batch_results = measure(runners, repeats, args.warmup, args.min_block_ms)
        results += batch_results
        for r in batch_results:
            print(f"  batch {b:4d} {r.framework:>12s} {r.step:>9s}: {r.median_ms:9.2f} ms "
                  f"(IQR {r.p25_ms:.2f}-{r.p75_ms:.2f})", flush=True)

    env["loadavg_end"] = os.getloadavg()
    if jax.default_backend() == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        env["jax_device_peak_mib"] = stats.get("peak_bytes_in_use", 0) / MIB
    summary = summarise(results)
    print()
    print(format_table(results, summary))
    for name, error in unavailable.items():
        print(f"- {name}: not run: {error}")
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


def cli_main(args: argparse.Namespace) -> int:
    """``--cli``: run both training CLIs, print their step times side by side, write JSON (``--out``)."""
    frameworks = [fw for fw in ("jax", "torch") if fw in args.frameworks]
    env = {"python": platform.python_version(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
           "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "loadavg_start": os.getloadavg(), "synthetic_shape": CLI_SYNTHETIC_SHAPE}
    print(f"training CLIs {', '.join(frameworks)}; {env['cpu_count']} CPUs, "
          f"load {env['loadavg_start'][0]:.2f}", flush=True)
    variants = cli_variants(frameworks, args.cli_jax_flags)
    rows = run_clis(variants, args.batch_sizes or CLI_BATCH_SIZES, args.cli_steps, args.cli_warmup,
                    args.repeats or 1, penalty_weight=args.penalty_weight, lr=args.lr, seed=args.seed)
    env["loadavg_end"] = os.getloadavg()
    print()
    print(format_cli_table(rows, variants))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": env, "cli": rows}, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
