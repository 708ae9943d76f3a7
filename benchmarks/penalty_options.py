"""``python -m benchmarks.penalty_options``: what each penalty option costs (JAX only).

Median time of one compiled ``jax.grad`` of ``penalized_loss`` on the seed
``Net`` (default 32x32x3, batch 32, float32), next to the plain loss's
gradient, for the option settings below. Warm-up excluded,
``block_until_ready`` on every call. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import format_machine, host_memory_setting, machine_report
from jax_impl import Net, cross_entropy_loss, penalized_loss

SETTINGS = {
    "exact (seed default)": {},
    "per_example": {"normalization": "per_example"},
    "l2": {"norm": "l2"},
    "input + relu1 + relu2": {"layers": ["input", "relu1", "relu2"]},
    "finite_difference": {"approx": "finite_difference"},
}


def median_ms(fn, params, repeats: int) -> float:
    jax.block_until_ready(fn(params))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.penalty_options",
                                description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    print(format_machine({**machine_report(jax=jax), **host_memory_setting()}), flush=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((args.batch_size, 32, 32, 3), np.float32))
    y = jnp.asarray(np.arange(args.batch_size) % 10)
    net = Net()
    params = net.init(jax.random.key(0), x)["params"]
    plain = jax.jit(jax.grad(lambda q: cross_entropy_loss(net.apply({"params": q}, x), y)))
    base = median_ms(plain, params, args.repeats)
    print(f"device: {jax.devices()[0].device_kind}, batch {args.batch_size}, float32, "
          f"median of {args.repeats}\n")
    print("| setting | ms / grad | x plain loss grad |\n|---|---|---|")
    print(f"| plain loss (no penalty) | {base:.1f} | 1.00 |")
    for name, options in SETTINGS.items():
        fn = jax.jit(jax.grad(lambda q, o=options: penalized_loss(q, net, x, y, penalty_weight=1.0, **o)[0]))
        ms = median_ms(fn, params, args.repeats)
        print(f"| {name} | {ms:.1f} | {ms / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
