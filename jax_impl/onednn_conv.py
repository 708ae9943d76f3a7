"""oneDNN's CPU convolutions inside XLA programs: ``Net(conv_impl="onednn")`` (opt-in).

The three convolution products of ``jax_impl.layers`` (VALID, stride 1,
NHWC activations, HWIO kernel; ``H' = H - kh + 1``, ``W' = W - kw + 1``)::

    conv_forward(x, k)       (B,H,W,Ci), (kh,kw,Ci,Co)   -> (B,H',W',Co)
        y[b,h,w,o]  = sum_{i,j,c} x[b,h+i,w+j,c] k[i,j,c,o]
    conv_input_grad(ct, k)   (B,H',W',Co), (kh,kw,Ci,Co) -> (B,H,W,Ci)
        dx[b,h,w,c] = sum_{i,j,o} ct[b,h-i,w-j,o] k[i,j,c,o]
    conv_kernel_grad(x, ct)  (B,H,W,Ci), (B,H',W',Co)    -> (kh,kw,Ci,Co)
        dk[i,j,c,o] = sum_{b,h,w} x[b,h+i,w+j,c] ct[b,h,w,o]

computed by oneDNN (the CPU kernels PyTorch uses) through XLA FFI custom
calls, in float32; other dtypes (the float64 parity suite) run XLA's
convolutions. ``onednn_conv`` / ``onednn_input_grad`` / ``onednn_kernel_grad``
wrap them with the derivative rules of ``layers.closed_under_vjp``, so the
penalised step's double backprop is these three calls throughout (reverse
mode to any order; no forward mode, like ``"canonical"``).

Why: XLA's CPU runtime computes the input gradient of ``conv2`` at 20-55
GFLOP/s; oneDNN's direct kernels reach 45-70 on the same busy 2-core machine
(docs in ``csrc/onednn_conv.cc`` on how the work is threaded).

Install (Linux x86-64): ``pip install 'activation-gradient-penalty[onednn]'``
(oneDNN's OpenMP build: the ``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``
wheels; the ``onednn`` wheel is the SYCL build, which finds no CPU device
without Intel's OpenCL runtime and is refused) and a C++17 compiler (``g++``,
or ``$CXX``). The first use compiles ``csrc/onednn_conv.cc`` against JAX's FFI
headers and oneDNN (~5-10 s) into ``$XDG_CACHE_HOME/agp/`` (default
``~/.cache/agp/``), named by a hash of the source, the compiler, and the
versions and locations of JAX and oneDNN; later processes load it. oneDNN is
looked up under ``sys.prefix`` and the user site base, or only under
``$AGP_ONEDNN_ROOT`` (a prefix with ``include/oneapi/dnnl/`` and
``lib/libdnnl.so``) when that is set.

``vmap``: the batch axis of a mapped call is folded into the convolution's
batch when the kernel is shared (``conv_forward``, ``conv_input_grad`` with an
unmapped kernel: one call); other mapped calls run one call per element
(``lax.map``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from jax_impl import layers

__all__ = [
    "FFI_TARGETS",
    "INSTALL_HINT",
    "ONEDNN",
    "SOURCE",
    "OneDNNInstall",
    "OneDNNUnavailable",
    "available",
    "build_library",
    "cache_dir",
    "conv_forward",
    "conv_input_grad",
    "conv_kernel_grad",
    "find_onednn",
    "onednn_conv",
    "onednn_input_grad",
    "onednn_kernel_grad",
    "unavailable_reason",
]

#: The C++ source of the three FFI handlers, shipped in the package.
SOURCE = Path(__file__).with_name("csrc") / "onednn_conv.cc"
#: XLA FFI target name -> symbol of the handler in the built library.
FFI_TARGETS = {
    "agp_onednn_conv_forward": "AgpOnednnConvForward",
    "agp_onednn_conv_input_grad": "AgpOnednnConvInputGrad",
    "agp_onednn_conv_kernel_grad": "AgpOnednnConvKernelGrad",
}
#: How to get the backend (named in the fallback warning).
INSTALL_HINT = ("pip install 'activation-gradient-penalty[onednn]' (oneDNN's CPU build) "
                "and a C++ compiler (apt-get install g++, or set CXX)")
CXX_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared")


class OneDNNUnavailable(RuntimeError):
    """The oneDNN backend cannot run here; the message says why."""


@dataclass(frozen=True)
class OneDNNInstall:
    """Where oneDNN's headers and library are, and its version (``"3.2.0"``)."""

    include_dir: Path
    lib_dir: Path
    version: str


def find_onednn() -> OneDNNInstall:
    """The first prefix holding ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so``.

    Searched: ``$AGP_ONEDNN_ROOT`` alone when set, else ``sys.prefix`` (where
    pip puts the wheels' data files) and the user site base (``pip install --user``).
    """
    root = os.environ.get("AGP_ONEDNN_ROOT")
    prefixes = [Path(root)] if root else list(dict.fromkeys([Path(sys.prefix), Path(site.getuserbase())]))
    for prefix in prefixes:
        header, lib = prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp", prefix / "lib" / "libdnnl.so"
        if header.is_file() and lib.exists():
            return OneDNNInstall(header.parent.parent.parent, lib.parent, _onednn_version(header.parent))
    raise OneDNNUnavailable(f"oneDNN not found under {', '.join(map(str, prefixes))}")


def _onednn_version(header_dir: Path) -> str:
    """``MAJOR.MINOR.PATCH`` from ``dnnl_version.h`` (``"unknown"`` if it cannot be read)."""
    try:
        text = (header_dir / "dnnl_version.h").read_text()
    except OSError:
        return "unknown"
    parts = [re.search(rf"#define DNNL_VERSION_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else "unknown"


def cache_dir() -> Path:
    """Per-user folder for the built library: ``$XDG_CACHE_HOME/agp`` (default ``~/.cache/agp``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "agp"


def _build_command(cxx: str, onednn: OneDNNInstall, output: Path) -> list[str]:
    """The compiler call: the FFI handlers against JAX's FFI headers and oneDNN, rpath to oneDNN's lib."""
    return [cxx, *CXX_FLAGS, str(SOURCE), "-isystem", jax.ffi.include_dir(), "-isystem",
            str(onednn.include_dir), f"-L{onednn.lib_dir}", "-ldnnl", "-lgomp",
            f"-Wl,-rpath,{onednn.lib_dir}", "-o", str(output)]


def _library_path(cxx: str, onednn: OneDNNInstall) -> Path:
    """Where the library built for this source, compiler, JAX and oneDNN lives (a content hash)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    for part in (cxx, *CXX_FLAGS, jax.__version__, jax.ffi.include_dir(), onednn.version,
                 str(onednn.include_dir), str(onednn.lib_dir)):
        key.update(b"\0" + part.encode())
    return cache_dir() / f"onednn_conv-{key.hexdigest()[:16]}.so"


def build_library() -> Path:
    """The built library, compiled first if this combination has none yet (atomically: temp file + rename)."""
    onednn = find_onednn()
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise OneDNNUnavailable(f"C++ compiler {cxx!r} not found")
    path = _library_path(cxx, onednn)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run(_build_command(cxx, onednn, Path(tmp)), capture_output=True, text=True)
        if proc.returncode != 0:
            raise OneDNNUnavailable(f"building {SOURCE.name} failed: {_first_error(proc.stderr)}")
        os.replace(tmp, path)  # atomic: a concurrent process sees no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _first_error(stderr: str) -> str:
    """The compiler's first error line, without the file path (or the last line)."""
    lines = [line for line in stderr.splitlines() if "error" in line] or stderr.splitlines()[-1:] or ["?"]
    return lines[0].split(": error: ", 1)[-1].strip()


@functools.cache
def _load() -> str:
    """Build (if needed) and load the library and register its FFI targets, once; ``""`` or why not."""
    try:
        lib = ctypes.CDLL(str(build_library()))
    except OneDNNUnavailable as e:
        return str(e)
    except OSError as e:  # the loader: a library moved or removed since the build
        return f"loading the oneDNN library failed: {e}"
    for target, symbol in FFI_TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return ""


def available() -> bool:
    """Whether the oneDNN convolutions can run in this process (builds the library on first call)."""
    return not _load()


def unavailable_reason() -> str:
    """Why ``available()`` is False, in one line (``""`` when it is True)."""
    return _load()


# ------------------------------------------------------------- the FFI products


def _ffi(target: str, shape: tuple[int, ...], a: jax.Array, b: jax.Array) -> jax.Array:
    """One custom call: float32 (a, b) -> float32 array of ``shape``."""
    if not available():
        raise OneDNNUnavailable(f"conv_impl='onednn' is unavailable: {unavailable_reason()}")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32))(a, b)


def _is_f32(a: jax.Array, b: jax.Array) -> bool:
    return a.dtype == jnp.float32 and b.dtype == jnp.float32


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


def conv_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``layers.conv_forward``, by oneDNN for float32 (XLA otherwise).

    (B, H, W, Ci), (kh, kw, Ci, Co) -> (B, H', W', Co).
    """
    return _forward_ffi(x, kernel) if _is_f32(x, kernel) else layers.conv_forward(x, kernel)


def conv_input_grad(ct: jax.Array, kernel: jax.Array) -> jax.Array:
    """``layers.conv_input_grad``, by oneDNN for float32 (XLA otherwise).

    (B, H', W', Co), (kh, kw, Ci, Co) -> (B, H, W, Ci).
    """
    return _input_grad_ffi(ct, kernel) if _is_f32(ct, kernel) else layers.conv_input_grad(ct, kernel)


def conv_kernel_grad(x: jax.Array, ct: jax.Array) -> jax.Array:
    """``layers.conv_kernel_grad``, by oneDNN for float32 (XLA otherwise).

    (B, H, W, Ci), (B, H', W', Co) -> (kh, kw, Ci, Co).
    """
    return _kernel_grad_ffi(x, ct) if _is_f32(x, ct) else layers.conv_kernel_grad(x, ct)


#: The three products with derivatives of every order that are the same three products (oneDNN).
ONEDNN = layers.closed_under_vjp(
    layers.ConvProducts(conv_forward, conv_input_grad, conv_kernel_grad), "onednn")
#: ``conv_forward`` (oneDNN for float32) whose derivatives of every order are oneDNN products.
onednn_conv = ONEDNN.forward
#: ``conv_input_grad`` with oneDNN-product derivatives.
onednn_input_grad = ONEDNN.input_grad
#: ``conv_kernel_grad`` with oneDNN-product derivatives.
onednn_kernel_grad = ONEDNN.kernel_grad
