"""Shared building blocks of the parity suite: tolerances, comparisons, layouts, identical weights.

Cross-framework code (it imports JAX and PyTorch). ``parity_tests/report.py``
and every test compare through :func:`compare`, so "agree" means the same
thing in the table and in the tests.

Error measure (per tensor, "normwise"): for the JAX value ``a`` and the
PyTorch value ``b`` of one quantity,

    max_abs = max_i |a_i - b_i|
    max_rel = max_abs / max_i |b_i|          (0 when both are exactly 0)

and the comparison passes iff ``max_abs <= atol + rtol * max_i |b_i|``. The
error is measured against the tensor's largest entry rather than entry by
entry because gradients hold many entries that are exactly zero (dead ReLUs,
non-maximal pooling inputs) or tiny after cancellation, for which an
entry-wise relative error says nothing about the agreement of the frameworks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

import torch_ref
from jax_impl import Net
from parity_tests import DTYPES

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class Tolerance:
    """``max_abs <= atol + rtol * max|expected|``, with the reason these numbers are right."""

    rtol: float
    atol: float
    reason: str

    def __str__(self) -> str:
        return f"rtol={self.rtol:.0e}" + (f" atol={self.atol:.0e}" if self.atol else "")


#: Tolerance for quantities computed once from identical weights and inputs.
TOLERANCES = {
    # Same math, different summation order and kernels: float64 rounding is ~1e-16 per op, and the
    # longest chains (double backprop through two convs) stay below ~1e-13; 1e-10 leaves 1000x headroom.
    "float64": Tolerance(1e-10, 0.0, "float64 rounding (~1e-16/op) through double backprop; 1000x headroom"),
    # float32 eps is 1.2e-7; sums of up to 800 products and four passes (forward, backward, and their
    # backward) give ~1e-6 of the tensor's scale; 1e-5 is the bound and leaves ~10x headroom.
    "float32": Tolerance(1e-5, 0.0, "float32 eps 1.2e-7 x sums of <=800 terms x 4 passes; ~10x headroom"),
}


@dataclass(frozen=True)
class Comparison:
    """One quantity of one case compared across frameworks (``scale`` is ``max|expected|``)."""

    quantity: str
    dtype: str
    max_abs: float
    scale: float
    tolerance: Tolerance
    case: str = ""

    @property
    def max_rel(self) -> float:
        if self.scale == 0.0:
            return 0.0 if self.max_abs == 0.0 else float("inf")
        return self.max_abs / self.scale

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.tolerance.atol + self.tolerance.rtol * self.scale

    def __str__(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return (f"{self.case} {self.quantity} [{self.dtype}]: max abs {self.max_abs:.2e}, "
                f"max rel {self.max_rel:.2e}, tol {self.tolerance}: {verdict}")


def compare(quantity: str, dtype: str, actual, expected, tolerance: Tolerance | None = None,
            case: str = "") -> Comparison:
    """Compare ``actual`` (JAX) with ``expected`` (PyTorch) normwise; see the module docstring.

    Shapes must match exactly (a layout mistake must not broadcast silently).
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"{quantity}: shape {actual.shape} (JAX) != {expected.shape} (PyTorch)")
    max_abs = float(np.max(np.abs(actual - expected), initial=0.0))
    scale = float(np.max(np.abs(expected), initial=0.0))
    return Comparison(quantity, dtype, max_abs, scale, tolerance or TOLERANCES[dtype], case)


def compare_trees(prefix: str, dtype: str, actual: Mapping, expected: Mapping,
                  tolerance: Tolerance | None = None, case: str = "") -> list[Comparison]:
    """Compare two nested dicts leaf by leaf: ``{prefix}[conv1.kernel]`` etc. Keys must match."""
    flat_a = traverse_util.flatten_dict(dict(actual), sep=".")
    flat_e = traverse_util.flatten_dict(dict(expected), sep=".")
    if set(flat_a) != set(flat_e):
        raise ValueError(f"{prefix}: keys {sorted(flat_a)} (JAX) != {sorted(flat_e)} (PyTorch)")
    return [compare(f"{prefix}[{k}]", dtype, flat_a[k], flat_e[k], tolerance, case) for k in sorted(flat_e)]


def failures(comparisons: list[Comparison]) -> list[Comparison]:
    return [c for c in comparisons if not c.passed]


def assert_all_pass(comparisons: list[Comparison]) -> None:
    """Fail with every failing comparison listed (not just the first)."""
    assert comparisons, "no comparisons were made"
    bad = failures(comparisons)
    assert not bad, "parity failures:\n" + "\n".join(str(c) for c in bad)


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run PyTorch's CPU kernels on one thread inside the block.

    On this project's 2-core machines XLA keeps its own thread pool busy and
    PyTorch's OpenMP workers then spin against it: one reference SGD step
    took 0.59 s with 2 threads and 0.037 s with 1 (batch 8, float64, loaded
    machine). Numbers stay within every tolerance either way.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """JAX's float32 convolutions and matmuls in full float32 inside the block.

    ``jax.default_matmul_precision("highest")``. On NVIDIA GPUs since Ampere XLA otherwise runs them
    on TF32 tensor cores (10 mantissa bits: activation gradients 11% off on an H100, see
    docs/parity.md), which no float32 comparison survives. CPUs compute float32 either way. The
    suite and the report run inside it; PyTorch's side runs on the CPU.
    """
    with jax.default_matmul_precision("highest"):
        yield


# ----------------------------------------------------------------------------------- layouts


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H, W, C): PyTorch activations to the JAX layout."""
    return np.ascontiguousarray(np.transpose(np.asarray(x), (0, 2, 3, 1)))


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    """(B, H, W, C) -> (B, C, H, W), contiguous (PyTorch's default NCHW strides)."""
    return np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2)))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# ------------------------------------------------------------------------- dtypes and data


@contextlib.contextmanager
def jax_dtype(dtype: str) -> Iterator[None]:
    """Run the block with JAX's 64-bit mode on for ``"float64"`` (off otherwise)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    with jax.enable_x64(dtype == "float64"):
        yield


def make_batch(seed: int, batch: int, dtype: str, channels: int = 3, size: int = 32
               ) -> tuple[np.ndarray, np.ndarray]:
    """A batch ``(x NCHW, y)`` in ``dtype``: pixels U[0, 1) like the seed's ``torch.rand``, labels in 0..9."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch, channels, size, size)).astype(dtype)
    y = rng.integers(0, 10, batch).astype(np.int64)
    return x, y


def torch_inputs(x_nchw: np.ndarray, y: np.ndarray, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The batch as PyTorch tensors (NCHW images, int64 labels) on ``device``."""
    return (torch.from_numpy(np.ascontiguousarray(x_nchw)).to(device),
            torch.from_numpy(y.astype(np.int64)).to(device))


def jax_inputs(x_nchw: np.ndarray, y: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """NHWC image batch and int32 labels (call inside :func:`jax_dtype`).

    ``jax.device_put``, not ``jnp.asarray``: the same arrays and dtypes, but ``jnp.asarray``
    compiles a small XLA program for every new shape (JAX 0.10), and the suite has many.
    """
    return jax.device_put((nchw_to_nhwc(x_nchw), y.astype(np.int32)))


def torch_net(seed: int, dtype: str) -> torch_ref.Net:
    """A ``torch_ref.Net`` with PyTorch's default init from ``torch.manual_seed(seed)``, in ``dtype``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch_ref.Net().to(TORCH_DTYPES[dtype])


#: XLA CPU options that spend less time compiling and more running: for compiled code whose
#: compiler effort does not matter to what is checked (weight generation, finite-difference checks
#: of JAX against itself, the verifier's short runs, the tests of tests/). They change no arithmetic
#: rule (no fast-math either way); LLVM may contract a multiply-add differently, so results can move
#: by an ulp. Optimisation level 0 without LLVM's expensive passes, and the classic elemental
#: emitter instead of XLA's newer fusion emitters. Measured on a loaded 2-core machine (float64,
#: batch 4): ``jit(Net().init)`` compiles in 0.5 s (9.1 s with XLA's defaults), the penalized loss's
#: gradient in 0.5 s and its vector-Jacobian product in 0.75 s (1.3, 1.9 and 3.1 s without the
#: emitter option, at the same run time). For small programs only: the code runs slower (a float64
#: PGD attack on 16 images took 38 s instead of 4).
FAST_COMPILE_CPU = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


@functools.cache
def _known_fast_compile_options() -> tuple[tuple[str, object], ...]:
    """:data:`FAST_COMPILE_CPU` less the options this jaxlib does not know (an unknown one fails the
    compile; the project supports jaxlibs older than the emitter option). One tiny compile per option."""
    known = []
    for name, value in FAST_COMPILE_CPU.items():
        try:
            jax.jit(lambda v: v + 1, compiler_options={name: value}).lower(1.0).compile()
        except Exception:  # jaxlib's own error type for an unknown option
            continue
        known.append((name, value))
    return tuple(known)


def fast_compile_options() -> dict[str, object] | None:
    """``compiler_options`` for ``jax.jit``: :data:`FAST_COMPILE_CPU` on CPU, XLA's defaults elsewhere."""
    return dict(_known_fast_compile_options()) if jax.default_backend() == "cpu" else None


def fast_jit(fun=None, **kwargs):
    """``jax.jit(fun, compiler_options=fast_compile_options(), **kwargs)``; see :data:`FAST_COMPILE_CPU`.

    The one fast-compiling ``jit`` of parity_tests/ and tests/, usable as ``@fast_jit`` or
    ``fast_jit(f, static_argnums=...)``. Only for code whose kernels are not what a test is about:
    the parity grid and the trajectory compile with the options users get.
    """
    if fun is None:
        return functools.partial(fast_jit, **kwargs)
    return jax.jit(fun, compiler_options=fast_compile_options(), **kwargs)


@functools.cache
def _jit_init():
    """``jax_impl.Net().init`` compiled once (op-by-op init costs more than one compilation).

    With :func:`fast_jit`: the weights it draws are copied into both frameworks, so how hard XLA
    optimised the random-number code does not matter (an ulp apart from the default compilation's,
    equally valid Flax-initialised weights), and it compiles over 10x faster.
    """
    return fast_jit(Net().init)


def identical_weights(seed: int, dtype: str, init_batch: int | None = None):
    """``(torch_net, flax_params)`` holding the same numbers.

    ``init_batch=None``: PyTorch initialises and the weights are exported to
    Flax (``export_flax_params``). ``init_batch=n``: ``jax_impl.Net().init`` on
    a batch of ``n`` images initialises and the weights are loaded into PyTorch
    (``load_flax_params``); this is how a batch size at init different from
    the batch size at apply is exercised. Call inside :func:`jax_dtype`.
    """
    net = torch_net(seed, dtype)
    if init_batch is None:
        params = jax.device_put(torch_ref.export_flax_params(net))  # see jax_inputs: no compilation
    else:
        dummy = jnp.zeros((init_batch, 32, 32, 3), dtype)
        params = _jit_init()(jax.random.key(seed), dummy)["params"]
        params = jax.tree.map(lambda p: p.astype(dtype), params)
        torch_ref.load_flax_params(net, jax.tree.map(np.asarray, params))
    return net, params
