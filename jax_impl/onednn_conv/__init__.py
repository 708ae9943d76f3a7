"""oneDNN's CPU convolutions inside XLA programs (what ``conv_impl="auto"`` runs on CPU once built).

The three convolution products of ``jax_impl.conv_products`` (VALID, stride 1,
NHWC activations, HWIO kernel; ``H' = H - kh + 1``, ``W' = W - kw + 1``)::

    conv_forward(x, k)       (B,H,W,Ci), (kh,kw,Ci,Co)   -> (B,H',W',Co)
    conv_input_grad(ct, k)   (B,H',W',Co), (kh,kw,Ci,Co) -> (B,H,W,Ci)
    conv_kernel_grad(x, ct)  (B,H,W,Ci), (B,H',W',Co)    -> (kh,kw,Ci,Co)

computed by oneDNN (the CPU kernels PyTorch uses) through XLA FFI custom
calls, in float32; other dtypes (the float64 parity suite) and examples too
large for oneDNN's 32-bit offsets run XLA's convolutions. ``onednn_conv`` /
``onednn_input_grad`` / ``onednn_kernel_grad`` wrap them with the derivative
rules of ``conv_products.closed_under_vjp``, so the penalised step's double
backprop is these three calls throughout (reverse mode to any order; no
forward mode, like ``"canonical"``). Shapes are checked before each call
(``ValueError``, as XLA raises for its own convolutions), and again by the
C++ handlers (an FFI error, never a read past a buffer).

Why: XLA's CPU runtime computes the input gradient of ``conv2`` at 20-55
GFLOP/s; oneDNN's direct kernels reach 45-70 on the same busy 2-core machine
(docs in ``csrc/onednn_conv.cc`` on how the work is threaded).

Install (Linux x86-64, part of the default install there): the
``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp`` wheels (oneDNN's OpenMP
build; the ``onednn`` wheel is the SYCL build, which finds no CPU device
without Intel's OpenCL runtime and is refused), a C++17 compiler (``g++``,
or ``$CXX``), then the explicit build step (scripts/setup.sh runs it)::

    python -m jax_impl.onednn_conv build     # ~5-10 s; "status" says what is there

It compiles ``csrc/onednn_conv.cc`` into a private cache folder (see
``library``); using the convolutions only loads that library after checking
its digest, and never compiles. Where it is not built, ``"auto"`` runs the
``"canonical"`` convolutions and says why in one line.

``vmap``: the batch axis of a mapped call is folded into the convolution's
batch when the kernel is shared (``conv_forward``, ``conv_input_grad`` with an
unmapped kernel: one call); other mapped calls run one call per element
(``lax.map``).
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

from jax_impl import conv_products
from jax_impl.onednn_conv import library
from jax_impl.onednn_conv.library import (
    FFI_TARGETS,
    INSTALL_HINT,
    SOURCE,
    OneDNNInstall,
    OneDNNUnavailable,
    cache_dir,
    find_onednn,
)

__all__ = [
    "FFI_TARGETS",
    "INSTALL_HINT",
    "MAX_EXAMPLE_ELEMENTS",
    "ONEDNN",
    "SOURCE",
    "OneDNNInstall",
    "OneDNNUnavailable",
    "available",
    "build",
    "build_library",
    "cache_dir",
    "conv_forward",
    "conv_input_grad",
    "conv_kernel_grad",
    "find_onednn",
    "fits_onednn",
    "library_built",
    "onednn_conv",
    "onednn_input_grad",
    "onednn_kernel_grad",
    "problem_shape",
    "unavailable_reason",
]

#: oneDNN's kernels address a tensor with 32-bit offsets (an image 2**24 pixels wide crashed them), so
#: the handlers take at most this many elements per example and tensor, channels rounded up to 16 (its
#: blocked layout), and sides of at most ``MAX_SIDE``; larger problems run XLA's convolutions.
MAX_EXAMPLE_ELEMENTS = 1 << 27
MAX_SIDE = 1 << 20
#: The handlers' batch is a C int64 but split into int-sized chunks.
MAX_BATCH = (1 << 31) - 1


# ------------------------------------------------------------------------------ the library


def build(timeout_s: float = library.BUILD_TIMEOUT_S, force: bool = False) -> Path:
    """The explicit build step (``library.build``); afterwards ``available()`` looks again."""
    try:
        return library.build(timeout_s, force)
    finally:
        _load.cache_clear()


#: The old name of ``build`` (it built on first use; now only this explicit call builds).
build_library = build

#: The library loaded into this process (registration of FFI targets is for the process's lifetime).
_loaded: list[ctypes.CDLL] = []
_loading = threading.Lock()


@functools.cache
def _load() -> str:
    """Load the verified library and register its FFI targets, once; ``""`` or why not. Never builds."""
    with _loading:  # two threads asking first must not register the targets twice
        return "" if _loaded else _load_once()


def _load_once() -> str:
    """``_load``'s work: verify (``library.built_library``), ``dlopen``, look up the handlers, register."""
    try:
        path = library.built_library()
        lib = ctypes.CDLL(str(path))
        capsules = {target: jax.ffi.pycapsule(getattr(lib, symbol)) for target, symbol in FFI_TARGETS.items()}
    except OneDNNUnavailable as e:
        return str(e)
    except (OSError, AttributeError) as e:  # the dynamic loader: e.g. libdnnl.so moved since the build
        return f"loading the oneDNN library failed: {e}"
    for target, capsule in capsules.items():
        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    _loaded.append(lib)
    return ""


def library_built() -> bool:
    """Whether a verified library for this installation is in the cache: what ``available()`` would load,
    checked without loading it or starting JAX's backends (for choices made before JAX starts, such as
    the training CLI's number of CPU devices)."""
    try:
        library.built_library()
    except OneDNNUnavailable:
        return False
    return True


def available() -> bool:
    """Whether the oneDNN convolutions can run in this process: the built library loads (never builds)."""
    return not _load()


def unavailable_reason() -> str:
    """Why ``available()`` is False, in one line (``""`` when it is True)."""
    return _load()


# ----------------------------------------------------------------------------- shape checks


def _dims(name: str, a: jax.Array, what: str, letters: str) -> tuple[int, ...]:
    if a.ndim != 4:
        raise ValueError(f"oneDNN {name}: {what} must have rank 4 {letters}, got shape {tuple(a.shape)}")
    return tuple(a.shape)


def _agree(name: str, label: str, first: tuple[str, int], second: tuple[str, int]) -> None:
    if first[1] != second[1]:
        raise ValueError(f"oneDNN {name}: the {label} of {first[0]} ({first[1]}) and {second[0]} "
                         f"({second[1]}) must be equal")


def problem_shape(op: str, a: jax.Array, b: jax.Array) -> tuple[int, int, int, int, int, int, int]:
    """``(B, H, W, Ci, Co, kh, kw)`` of the product ``op`` on ``(a, b)``; ``ValueError`` naming the
    operand when ranks, batches, channels or the window do not agree (as XLA raises for its own)."""
    X, K, CT = "(B, H, W, Ci)", "(kh, kw, Ci, Co)", "(B, H', W', Co)"
    if op == "conv_forward":
        (bs, h, w, ci), (kh, kw, kci, co) = _dims(op, a, "x", X), _dims(op, b, "kernel", K)
        _agree(op, "input channels", ("x", ci), ("kernel", kci))
    elif op == "conv_input_grad":
        (bs, ho, wo, co), (kh, kw, ci, kco) = _dims(op, a, "ct", CT), _dims(op, b, "kernel", K)
        _agree(op, "output channels", ("ct", co), ("kernel", kco))
        h, w = ho + kh - 1, wo + kw - 1
    else:
        (bs, h, w, ci), (cbs, ho, wo, co) = _dims(op, a, "x", X), _dims(op, b, "ct", CT)
        _agree(op, "batch sizes", ("x", bs), ("ct", cbs))
        kh, kw = h - ho + 1, w - wo + 1
    if min(kh, kw) < 1 or kh > h or kw > w:
        raise ValueError(f"oneDNN {op}: the kernel window {kh}x{kw} must be at least 1x1 and fit in the "
                         f"{h}x{w} image (VALID padding); shapes {tuple(a.shape)}, {tuple(b.shape)}")
    return bs, h, w, ci, co, kh, kw


def fits_onednn(shape: tuple[int, int, int, int, int, int, int]) -> bool:
    """Whether a problem ``(B, H, W, Ci, Co, kh, kw)`` is within the handlers' limits (``MAX_*``)."""
    bs, h, w, ci, co, kh, kw = shape
    ci16, co16 = (16 * math.ceil(c / 16) for c in (ci, co))
    per_example = (h * w * ci16, (h - kh + 1) * (w - kw + 1) * co16, kh * kw * ci16 * co16)
    return bs <= MAX_BATCH and max(h, w) <= MAX_SIDE and max(per_example) <= MAX_EXAMPLE_ELEMENTS


# ------------------------------------------------------------------------- the FFI products


def _ffi(target: str, shape: tuple[int, ...], a: jax.Array, b: jax.Array) -> jax.Array:
    """One custom call: float32 (a, b) -> float32 array of ``shape``."""
    if not available():
        raise OneDNNUnavailable(f"the oneDNN convolutions are unavailable: {unavailable_reason()}")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32))(a, b)


def _fold_or_map(product, fold_first: bool):
    """A ``custom_vmap`` rule for ``product(a, b)``.

    ``fold_first``: when only ``a`` is mapped and its leading axis is the
    convolution's batch, ``(V, B, ...) -> (V*B, ...)``: one call for the whole
    map. Anything else maps ``product`` over the mapped axis (``lax.map``).
    """

    def rule(axis_size, in_batched, a, b):
        a_mapped, b_mapped = in_batched
        if fold_first and a_mapped and not b_mapped:
            out = product(a.reshape(-1, *a.shape[2:]), b)
            return out.reshape(axis_size, -1, *out.shape[1:]), True
        mapped = (a if a_mapped else None, b if b_mapped else None)
        return jax.lax.map(lambda ab: product(a if ab[0] is None else ab[0], b if ab[1] is None else ab[1]),
                           mapped), True

    return rule


@jax.custom_batching.custom_vmap
def _forward_ffi(x, kernel):
    b, h, w, _ = x.shape
    kh, kw, _, co = kernel.shape
    return _ffi("agp_onednn_conv_forward", (b, h - kh + 1, w - kw + 1, co), x, kernel)


@jax.custom_batching.custom_vmap
def _input_grad_ffi(ct, kernel):
    b, ho, wo, _ = ct.shape
    kh, kw, ci, _ = kernel.shape
    return _ffi("agp_onednn_conv_input_grad", (b, ho + kh - 1, wo + kw - 1, ci), ct, kernel)


@jax.custom_batching.custom_vmap
def _kernel_grad_ffi(x, ct):
    _, h, w, ci = x.shape
    _, ho, wo, co = ct.shape
    return _ffi("agp_onednn_conv_kernel_grad", (h - ho + 1, w - wo + 1, ci, co), x, ct)


_forward_ffi.def_vmap(_fold_or_map(_forward_ffi, fold_first=True))
_input_grad_ffi.def_vmap(_fold_or_map(_input_grad_ffi, fold_first=True))
_kernel_grad_ffi.def_vmap(_fold_or_map(_kernel_grad_ffi, fold_first=False))  # a sum over each element's batch


def _by_onednn(op: str, a: jax.Array, b: jax.Array) -> bool:
    """Checks the shapes (``ValueError``); whether oneDNN computes this call (float32, within limits)."""
    shape = problem_shape(op, a, b)
    return a.dtype == jnp.float32 and b.dtype == jnp.float32 and fits_onednn(shape)


def conv_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``conv_products.conv_forward``, by oneDNN for float32 (XLA otherwise).

    (B, H, W, Ci), (kh, kw, Ci, Co) -> (B, H', W', Co).
    """
    if _by_onednn("conv_forward", x, kernel):
        return _forward_ffi(x, kernel)
    return conv_products.conv_forward(x, kernel)


def conv_input_grad(ct: jax.Array, kernel: jax.Array) -> jax.Array:
    """``conv_products.conv_input_grad``, by oneDNN for float32 (XLA otherwise).

    (B, H', W', Co), (kh, kw, Ci, Co) -> (B, H, W, Ci).
    """
    if _by_onednn("conv_input_grad", ct, kernel):
        return _input_grad_ffi(ct, kernel)
    return conv_products.conv_input_grad(ct, kernel)


def conv_kernel_grad(x: jax.Array, ct: jax.Array) -> jax.Array:
    """``conv_products.conv_kernel_grad``, by oneDNN for float32 (XLA otherwise).

    (B, H, W, Ci), (B, H', W', Co) -> (kh, kw, Ci, Co).
    """
    if _by_onednn("conv_kernel_grad", x, ct):
        return _kernel_grad_ffi(x, ct)
    return conv_products.conv_kernel_grad(x, ct)


#: The three products with derivatives of every order that are the same three products (oneDNN).
ONEDNN = conv_products.closed_under_vjp(
    conv_products.ConvProducts(conv_forward, conv_input_grad, conv_kernel_grad), "onednn")
#: ``conv_forward`` (oneDNN for float32) whose derivatives of every order are oneDNN products.
onednn_conv = ONEDNN.forward
#: ``conv_input_grad`` with oneDNN-product derivatives.
onednn_input_grad = ONEDNN.input_grad
#: ``conv_kernel_grad`` with oneDNN-product derivatives.
onednn_kernel_grad = ONEDNN.kernel_grad
