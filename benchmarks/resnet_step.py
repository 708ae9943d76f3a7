"""Penalised training step of a ResNet written with ``flax.linen.Conv``, against its PyTorch twin.

The network is the Hugging Face ResNet (``FlaxResNetForImageClassification``
and ``ResNetForImageClassification``, same ``ResNetConfig``: ResNet-18 by
default, a 7x7/2 stem, 3x3/2 max-pool, BasicBlocks with strided 3x3 and 1x1
convolutions, BatchNorm) or the project's CIFAR-style ResNet-18
(``jax_impl.resnet`` / ``torch_ref.resnet``: 3x3 stem, no pool). Both
frameworks train in train mode (batch statistics) with SGD and the
activation gradient penalty on the four stage outputs, captured by module
path (``capture_modules``; forward hooks and ``torch.autograd.grad(...,
create_graph=True)`` on the PyTorch side)::

    total = CE + w * sum_{stage} ||d CE / d stage_output||^2

Rows: ``jax`` (``penalized_loss`` as a user calls it: the ``nn.Conv``
layers get fast derivatives on CPU, ``jax_impl.fast_conv``), ``jax-flax``
(``fast_convolutions=False``: flax's own convolutions and XLA's derivatives;
``--no-flax`` skips it, it is slow) and ``torch``. Each step is compiled
(JAX) or warmed up (PyTorch) first, then the rows run interleaved, one step
each in rotating order, ``--rounds`` times; the table gives the median ms per
step (and the fastest one: on a shared machine the least disturbed) and
torch/jax (> 1: JAX faster). Run::

    python -m benchmarks.resnet_step --model hf --size 64 --batch 8
    python -m benchmarks.resnet_step --model cifar --size 32 --batch 8 32 --width 64

This module imports both JAX and PyTorch (cross-framework code).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.machine import host_memory_setting
from jax_impl import fast_convolutions, jit_options, penalized_loss

PENALTY_WEIGHT = 0.1
LEARNING_RATE = 0.01
NUM_CLASSES = 10
#: Capture points: the four stage outputs, by module path in each framework.
CAPTURES = {
    "hf": ({f"stage{i}": f"resnet/encoder/stages/{i}" for i in range(4)},
           {f"stage{i}": f"resnet.encoder.stages.{i}" for i in range(4)}),
    "cifar": ({f"stage{i}": f"layer{i + 1}" for i in range(4)},
              {f"stage{i}": f"layer{i + 1}" for i in range(4)}),
}


def machine() -> str:
    """CPU model, cores this process may use, load average: the line printed above the table."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0]
    return f"{model}, {cores} cores, load {load:.2f}, jax {jax.__version__} on {jax.default_backend()}"


def hf_config(width: int):
    """ResNet-18 in Hugging Face's ``ResNetConfig`` (``width`` 64 is the paper's)."""
    from transformers import ResNetConfig

    widths = [width * 2**i for i in range(4)]
    return ResNetConfig(layer_type="basic", embedding_size=width, hidden_sizes=widths, depths=[2, 2, 2, 2],
                        num_labels=NUM_CLASSES)


def jax_model(name: str, width: int, x: np.ndarray) -> tuple[Callable, dict, dict]:
    """``(apply in train mode, params, batch_stats)`` of the Flax network, NHWC input."""
    if name == "hf":
        from transformers import FlaxResNetForImageClassification

        model = FlaxResNetForImageClassification(hf_config(width), input_shape=x.shape, seed=0)
        return functools.partial(model.module.apply, deterministic=False), model.params["params"], \
            model.params["batch_stats"]
    from jax_impl.resnet import ResNet18

    module = ResNet18(num_classes=NUM_CLASSES, width=width)
    variables = module.init(jax.random.key(0), jnp.asarray(x))
    return functools.partial(module.apply, train=True), variables["params"], variables["batch_stats"]


def torch_model(torch, name: str, width: int):
    """The PyTorch twin in train mode (NCHW input)."""
    torch.manual_seed(0)
    if name == "hf":
        from transformers import ResNetForImageClassification

        return ResNetForImageClassification(hf_config(width)).train()
    from torch_ref.resnet import ResNet18

    return ResNet18(num_classes=NUM_CLASSES, width=width).train()


def jax_stepper(name: str, width: int, x: np.ndarray, y: np.ndarray, impl: str | None) -> Callable[[], None]:
    """One compiled penalised SGD step (state donated and carried), as a no-argument function.

    ``impl``: ``"default"`` (``penalized_loss`` as is), a ``fast_convolutions``
    impl (``"canonical"``, ``"onednn"``), or ``None`` (flax's own convolutions).
    """
    apply, params, batch_stats = jax_model(name, width, x)
    tx = optax.sgd(LEARNING_RATE)
    captures = CAPTURES[name][0]

    def loss(p, stats, xb, yb):
        total, aux = penalized_loss(p, apply, xb, yb, penalty_weight=PENALTY_WEIGHT,
                                    model_state={"batch_stats": stats}, mutable=["batch_stats"],
                                    capture_modules=captures, fast_convolutions=impl == "default")
        return total, aux["model_state"]["batch_stats"]

    def step(p, stats, opt_state, xb, yb):
        (total, stats), grads = jax.value_and_grad(loss, has_aux=True)(p, stats, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), stats, opt_state, total

    xb, yb = jax.device_put(x), jax.device_put(y)
    state = [params, batch_stats, tx.init(params)]
    chosen = fast_convolutions(True, impl=impl) if impl not in (None, "default") else contextlib.nullcontext()
    with chosen:  # traced inside
        options = jit_options(conv_impl=impl if impl in ("canonical", "onednn") else "auto")
        compiled = jax.jit(step, donate_argnums=(0, 1, 2), **options).lower(*state, xb, yb).compile()

    def run() -> None:
        *new_state, total = compiled(*state, xb, yb)
        state[:] = new_state
        total.block_until_ready()

    return run


def torch_stepper(torch, name: str, width: int, x: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    """One eager penalised SGD step of the PyTorch twin, as a no-argument function."""
    from torch_ref import penalized_loss as torch_penalized_loss

    model = torch_model(torch, name, width)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    xb = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
    yb = torch.from_numpy(y.astype(np.int64))
    captures = CAPTURES[name][1]

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        total, _ = torch_penalized_loss(model, xb, yb, PENALTY_WEIGHT, capture_modules=captures)
        total.backward()
        optimizer.step()

    return run


def interleaved(runners: dict[str, Callable[[], None]], rounds: int, warmup: int = 1, pause: float = 0.2
                ) -> dict[str, list[float]]:
    """Seconds of each call of each runner, calls interleaved in rotating order.

    ``pause`` seconds before each timed call: the worker threads of the call
    before (XLA's pool, OpenMP's in oneDNN and PyTorch) spin for a while
    after their work and would take cores from the next call.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(pause)
            start = time.perf_counter()
            runners[k]()
            times[k].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("hf", "cifar"), default="hf")
    parser.add_argument("--size", type=int, nargs="+", default=[64], help="image side(s), pixels")
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--width", type=int, default=64, help="stem width (64: ResNet-18)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of idle before each timed step")
    parser.add_argument("--no-flax", action="store_true", help="skip the slow jax-flax row")
    parser.add_argument("--impls", nargs="*", default=[], choices=("canonical", "onednn"),
                        help="extra rows: the fast convolutions with this product implementation")
    args = parser.parse_args(argv)

    import torch

    memory = host_memory_setting()["host_memory"]  # as the training CLIs do
    print(f"# {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads); host memory: "
          f"{memory}", flush=True)
    print(f"# {args.model} ResNet-18, width {args.width}, float32, penalised SGD step, ms (median of "
          f"{args.rounds}, interleaved)", flush=True)
    rng = np.random.default_rng(0)
    for size in args.size:
        for batch in args.batch:
            x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
            y = rng.integers(0, NUM_CLASSES, size=batch).astype(np.int32)
            runners: dict[str, Any] = {"jax": jax_stepper(args.model, args.width, x, y, "default")}
            for impl in args.impls:
                runners[f"jax-{impl}"] = jax_stepper(args.model, args.width, x, y, impl)
            if not args.no_flax:
                runners["jax-flax"] = jax_stepper(args.model, args.width, x, y, None)
            runners["torch"] = torch_stepper(torch, args.model, args.width, x, y)
            seconds = interleaved(runners, args.rounds, pause=args.pause)
            for stat in (statistics.median, min):  # min: the least disturbed step, on a shared machine
                ms = {k: 1e3 * stat(v) for k, v in seconds.items()}
                times = "  ".join(f"{k} {v:.1f}" for k, v in ms.items())
                ratios = "  ".join(f"torch/{k} {ms['torch'] / v:.2f}" for k, v in ms.items() if k != "torch")
                print(f"size {size} batch {batch} {stat.__name__}: ms {times} | {ratios}", flush=True)


if __name__ == "__main__":
    main()
