"""``python -m parity_tests.gpu_precision``: float32 on the GPU, per precision setting, against float64.

Cross-framework (JAX and PyTorch). On recent NVIDIA GPUs (Ampere and
later) both frameworks may run float32 convolutions and matrix products on
TF32 tensor cores, which keep 10 of float32's 23 mantissa bits: ~1e-3
relative error per product instead of ~1e-7. This module measures what each
framework's settings give on the device at hand and which settings float32
parity (the suite's 1e-5 normwise tolerance) needs.

Settings:

* JAX: ``jax.default_matmul_precision(p)`` with ``p`` = ``"default"`` (XLA's
  choice, which is what users get) or ``"highest"`` (full float32); the same
  as ``JAX_DEFAULT_MATMUL_PRECISION=highest`` for a whole process. It governs
  ``conv_general_dilated`` and ``dot_general`` whose ``precision`` is unset,
  as in ``jax_impl``.
* PyTorch: ``"default"`` (the process's settings as found) or ``"ieee"``:
  ``torch.backends.cudnn.conv.fp32_precision = "ieee"`` and
  ``torch.backends.cuda.matmul.fp32_precision = "ieee"`` (PyTorch >= 2.9;
  ``torch.backends.cudnn.allow_tf32 = False`` and
  ``torch.backends.cuda.matmul.allow_tf32 = False`` before).

Every quantity of the parity grid (logits, loss, penalty and its terms,
activation gradients, every parameter gradient of the total) is computed in
float32 by JAX on ``jax.devices()[0]`` and by ``torch_ref`` on
``--torch-device`` (default: cuda when available) for each setting, on
identical weights, and compared normwise (``harness.compare``) with a float64
reference (``torch_ref`` on the CPU), and JAX against PyTorch for each pair
of settings; float64 on the same devices is compared with the reference too
(tolerance 1e-10). Printed: two tables, the worst relative error and the quantity
it occurs in. Exit status 1 if the JAX-against-PyTorch comparison at the
strictest settings ("highest" / "ieee") misses the float32 tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
import numpy as np
import torch

from parity_tests.comparisons import compare_quantities, jax_quantities, torch_quantities
from parity_tests.harness import TOLERANCES, Comparison, identical_weights, jax_dtype, make_batch

JAX_SETTINGS = ("default", "highest")
TORCH_SETTINGS = ("default", "ieee")
PENALTY_WEIGHT = 10.0


def _fp32_precision_api() -> bool:
    """Whether this PyTorch has the ``fp32_precision`` switches (>= 2.9; mixing them with the older
    ``allow_tf32`` ones is an error, so one of the two is used throughout)."""
    return hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


@contextlib.contextmanager
def torch_fp32_precision(setting: str) -> Iterator[None]:
    """PyTorch's float32 convolutions and matmuls as found (``"default"``) or in full float32 (``"ieee"``)."""
    if setting == "default":
        yield
        return
    if setting != "ieee":
        raise ValueError(f"setting must be one of {TORCH_SETTINGS}, got {setting!r}")
    conv, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if _fp32_precision_api():
        before = conv.conv.fp32_precision, matmul.fp32_precision
        conv.conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.conv.fp32_precision, matmul.fp32_precision = before
    else:
        before = conv.allow_tf32, matmul.allow_tf32
        conv.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            conv.allow_tf32, matmul.allow_tf32 = before


def torch_precision_flags() -> str:
    """The process's PyTorch TF32 settings, for the record."""
    conv, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if _fp32_precision_api():
        return f"cudnn.conv.fp32_precision={conv.conv.fp32_precision}, cuda.matmul.fp32_precision=" \
               f"{matmul.fp32_precision}, float32_matmul_precision={torch.get_float32_matmul_precision()}"
    return f"cudnn.allow_tf32={conv.allow_tf32}, cuda.matmul.allow_tf32={matmul.allow_tf32}"


@dataclass(frozen=True)
class Row:
    """The worst comparison of one side/setting (or one pair of settings) over every quantity."""

    label: str
    worst: Comparison
    passed: bool


def worst(label: str, comparisons: Sequence[Comparison]) -> Row:
    return Row(label, max(comparisons, key=lambda c: c.max_rel), all(c.passed for c in comparisons))


def measure(batch: int, torch_device: str, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """``(against float64, JAX against PyTorch)`` rows for every setting and pair of settings."""
    x, y = make_batch(seed + 1, batch, "float32")
    with jax_dtype("float32"):
        net, params = identical_weights(seed, "float32")
        jax_f32 = {}
        for setting in JAX_SETTINGS:
            with jax.default_matmul_precision(setting):
                jax_f32[setting] = jax_quantities(params, x, y, PENALTY_WEIGHT)
    x64 = x.astype(np.float64)
    reference = torch_quantities(copy.deepcopy(net).double(), x64, y, PENALTY_WEIGHT)
    with jax_dtype("float64"):
        # Widened in NumPy (exact either way): ``p.astype`` on the JAX arrays compiled one small
        # program per parameter shape.
        params64 = jax.tree.map(lambda p: np.asarray(p, dtype=np.float64), params)
        jax_f64 = jax_quantities(params64, x64, y, PENALTY_WEIGHT)
    torch_f64 = torch_quantities(copy.deepcopy(net).double().to(torch_device), x64, y, PENALTY_WEIGHT)
    net = net.to(torch_device)
    torch_f32 = {}
    for setting in TORCH_SETTINGS:
        with torch_fp32_precision(setting):
            torch_f32[setting] = torch_quantities(net, x, y, PENALTY_WEIGHT)

    f32 = TOLERANCES["float32"]
    jax_side, torch_side = f"JAX on {jax.devices()[0].platform}", f"PyTorch on {torch_device}"
    against_f64 = [worst(f"{jax_side}, precision {s}",
                         compare_quantities("float32", q, reference, tolerance=f32))
                   for s, q in jax_f32.items()]
    against_f64 += [worst(f"{torch_side}, {s}", compare_quantities("float32", q, reference, tolerance=f32))
                    for s, q in torch_f32.items()]
    against_f64 += [worst(f"{side}, float64", compare_quantities("float64", q, reference))
                    for side, q in ((jax_side, jax_f64), (torch_side, torch_f64))]
    pairs = [worst(f"JAX {js} / PyTorch {ts}", compare_quantities("float32", jax_f32[js], torch_f32[ts]))
             for js in JAX_SETTINGS for ts in TORCH_SETTINGS]
    return against_f64, pairs


def format_rows(title: str, rows: Sequence[Row]) -> str:
    lines = [f"| {title} | worst max rel err | in | within tolerance |", "|---|---:|---|---|"]
    lines += [f"| {r.label} | {r.worst.max_rel:.1e} | {r.worst.quantity} | "
              f"{'yes' if r.passed else 'no'} ({r.worst.tolerance.rtol:.0e}) |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m parity_tests.gpu_precision",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--torch-device", default=None, help="PyTorch's device (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch_device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if torch_device.startswith("cuda") else "no CUDA device"
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on "
          f"{torch_device} ({gpu}); batch {args.batch}, float32, penalty weight {PENALTY_WEIGHT:g}")
    print(f"- PyTorch's settings as found: {torch_precision_flags()}")
    print(f"- JAX's jax_default_matmul_precision as found: {jax.config.jax_default_matmul_precision}")
    against_f64, pairs = measure(args.batch, torch_device)
    print()
    print(format_rows("float32 against float64 (PyTorch, CPU)", against_f64))
    print()
    print(format_rows("JAX against PyTorch, both float32", pairs))
    strictest = pairs[-1]  # JAX "highest" / PyTorch "ieee"
    return 0 if strictest.passed else 1


if __name__ == "__main__":
    sys.exit(main())
