"""Building blocks of the seed CNN, written so that they match PyTorch exactly.

Three pieces live here:

* ``capture(module, name, x)``: the one line a model adds to make ``x`` a
  capture point of the activation gradient penalty (``perturb`` + ``sow``).
* ``Conv2D``: a VALID, stride-1 convolution with the parameter layout of
  ``flax.linen.Conv`` (``kernel`` HWIO, ``bias``) and PyTorch's default
  initialisation, computed by XLA's native convolution, by the same
  convolution with derivative rules that keep every derivative order a
  canonical (fast) convolution, the same rules with oneDNN computing the
  products (opt-in, CPU), or as patch extraction followed by one matmul
  (``impl``; ``"auto"`` picks per backend).
* ``max_pool_2x2``: 2x2/stride-2 max pooling whose gradient goes to the
  *first* maximum of each window in row-major order, as PyTorch's
  ``MaxPool2d`` does, and which stays differentiable twice.

Conventions: activations are NHWC; PyTorch is NCHW.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from agp_common.config import CONV_IMPLS

#: Collection that ``capture`` sows activations into (read them back with
#: ``model.apply(..., mutable=["intermediates"])``).
INTERMEDIATES = "intermediates"
#: Collection that holds the zero perturbations whose gradient is d loss / d a.
PERTURBATIONS = "perturbations"



def capture(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
    """Mark ``x`` as a capture point called ``name`` and return it.

    ``a = x + p`` with a zero perturbation ``p`` (``Module.perturb``), so
    ``d loss / d p == d loss / d a``; ``a`` is also sown into the
    ``"intermediates"`` collection for inspection. When neither collection is
    passed to ``apply`` both are no-ops and the model runs as usual.
    """
    x = module.perturb(name, x, collection=PERTURBATIONS)
    module.sow(INTERMEDIATES, name, x)
    return x


def torch_default_uniform(fan_in: int):
    """PyTorch's default ``Conv2d``/``Linear`` init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    (``kaiming_uniform_(a=sqrt(5))`` for weights reduces to this bound, and
    biases use the same bound.) Using it makes freshly initialised JAX and
    PyTorch models statistically alike; parity tests copy exact weights anyway.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        # Drawn flat and reshaped: with JAX's default generator the same numbers as drawing
        # ``shape`` directly (it fills row-major), and XLA compiles the flat draw of a rank-4 kernel
        # ~1.6x faster (tests/test_model.py checks the numbers).
        return jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound).reshape(shape)

    return init


def resolve_conv_impl(impl: str, backend: str | None = None) -> str:
    """The convolution ``impl`` runs as on ``backend`` (default: JAX's default backend).

    ``"auto"`` maps to the faster built-in convolution for the backend.
    ``"onednn"`` (opt-in, ``jax_impl.onednn_conv``) stays ``"onednn"`` on CPU
    when oneDNN and a C++ compiler are there; otherwise it is ``"canonical"``:
    silently off CPU, with one warning naming the reason and the fix on CPU.
    Every other name maps to itself.

    Measured with ``python -m benchmarks.step_time`` (docs/performance.md):
    on CPU, XLA differentiates the input-gradient convolution into a
    window-reversed convolution that its CPU runtime runs through a naive loop
    (~1.7 GFLOP/s), so the penalised step uses ``"canonical"`` there; on GPU
    and TPU the native convolution (``"xla"``) is used. With the CPU options of
    ``jit_options()`` (Eigen convolutions), ``"canonical"`` stays 2.5-4x faster
    than ``"xla"`` (jax_impl/xla_options.py).
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    backend = backend or jax.default_backend()
    if impl == "auto":
        return "canonical" if backend == "cpu" else "xla"
    if impl == "onednn":
        if backend != "cpu":
            return "canonical"  # oneDNN is a CPU library; the canonical products are its exact stand-in
        from jax_impl import onednn_conv  # lazy: it imports this module, and may build its library

        if not onednn_conv.available():
            _warn_onednn_unavailable(onednn_conv.unavailable_reason())
            return "canonical"
    return impl


@functools.cache
def _warn_onednn_unavailable(reason: str) -> None:
    """One warning per process (and reason), however many layers ask for ``"onednn"``."""
    from jax_impl.onednn_conv import INSTALL_HINT

    warnings.warn(f"conv_impl='onednn' is unavailable ({reason}); using 'canonical' instead. "
                  f"Fix: {INSTALL_HINT}.", RuntimeWarning, stacklevel=3)


def extract_patches(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """VALID stride-1 patches of ``x``, ordered (kh, kw, C) like an HWIO kernel.

    (B, H, W, C) -> (B, H-kh+1, W-kw+1, kh*kw*C). Built from static slices and
    one concatenate, so both its gradient (pad + add) and the gradient of that
    are cheap and exact.
    """
    _, h, w, _ = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    slices = [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(slices, axis=-1)


#: NHWC input, HWIO kernel, NHWC output: the layout of ``flax.linen.Conv``.
CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """VALID stride-1 cross-correlation (XLA): (B, H, W, Ci) * (kh, kw, Ci, Co) -> (B, H', W', Co).

    ``y[b, h, w, o] = sum_{i, j, c} x[b, h+i, w+j, c] * kernel[i, j, c, o]``.
    """
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=CONV_DIMENSIONS)


def conv_input_grad(ct: jax.Array, kernel: jax.Array) -> jax.Array:
    """``d <y, ct> / d x`` of ``conv_forward``: (B, H', W', Co), (kh, kw, Ci, Co) -> (B, H, W, Ci).

    A "full" correlation of ``ct`` with the spatially flipped kernel, inputs
    and outputs swapped: ``dx[b, h, w, c] = sum_{i, j, o} ct[b, h-i, w-j, o] *
    kernel[i, j, c, o]`` (zero outside ``ct``). Written as a plain forward
    convolution of the padded cotangent, the form XLA runs fastest.
    """
    kh, kw = kernel.shape[:2]
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)  # (kh, kw, Co, Ci)
    return jax.lax.conv_general_dilated(ct, flipped, (1, 1), ((kh - 1, kh - 1), (kw - 1, kw - 1)),
                                        dimension_numbers=CONV_DIMENSIONS)


def conv_kernel_grad(x: jax.Array, ct: jax.Array) -> jax.Array:
    """``d <y, ct> / d kernel`` of ``conv_forward``: (B, H, W, Ci), (B, H', W', Co) -> (kh, kw, Ci, Co).

    ``dk[i, j, c, o] = sum_{b, h, w} x[b, h+i, w+j, c] * ct[b, h, w, o]``: a
    VALID correlation of ``x`` with ``ct`` in which the batch is the
    contracted axis (``x`` read as "CHWN", ``ct`` as the kernel "IHWO").
    """
    return jax.lax.conv_general_dilated(x, ct, (1, 1), "VALID", dimension_numbers=("CHWN", "IHWO", "HWNC"))


# The three products above are bilinear and close under differentiation:
#   conv_forward(x, k):      dx = conv_input_grad(ct, k),  dk = conv_kernel_grad(x, ct)
#   conv_input_grad(g, k):   dg = conv_forward(c, k),      dk = conv_kernel_grad(c, g)
#   conv_kernel_grad(x, g):  dx = conv_input_grad(g, c),   dg = conv_forward(x, c)
# (c is the incoming cotangent; each line is <f(a, b), c> differentiated by a and b).
# Declaring these rules with custom_vjp keeps every derivative, of any order, one
# of the three canonical convolutions. XLA's own autodiff instead turns the
# derivative of the input gradient with respect to the kernel (needed by double
# backprop) into a window-reversed, batch/feature-swapped convolution that the
# CPU runtime executes ~100x slower than the others (see benchmarks/).


class ConvProducts(NamedTuple):
    """One implementation of the three convolution products above (same arguments, same values)."""

    forward: Callable[[jax.Array, jax.Array], jax.Array]  # (x, kernel) -> y
    input_grad: Callable[[jax.Array, jax.Array], jax.Array]  # (ct, kernel) -> dx
    kernel_grad: Callable[[jax.Array, jax.Array], jax.Array]  # (x, ct) -> dkernel


def closed_under_vjp(products: ConvProducts, name: str) -> ConvProducts:
    """Wrap the three products in ``custom_vjp`` so that their derivatives are the same three products.

    ``products`` computes ``conv_forward``, ``conv_input_grad`` and
    ``conv_kernel_grad`` (XLA's convolutions here, oneDNN's in
    ``jax_impl.onednn_conv``). The returned functions compute the same
    values, and their reverse-mode derivatives of every order are calls of
    the returned functions again, by the table above; forward mode
    (``jax.jvp``) is not defined. ``name`` prefixes their names in jaxprs
    and profiles (``{name}_conv``, ``{name}_input_grad``, ``{name}_kernel_grad``).
    """

    def forward(x, kernel):
        return products.forward(x, kernel)

    def input_grad(ct, kernel):
        return products.input_grad(ct, kernel)

    def kernel_grad(x, ct):
        return products.kernel_grad(x, ct)

    for fn, suffix in ((forward, "conv"), (input_grad, "input_grad"), (kernel_grad, "kernel_grad")):
        fn.__name__ = fn.__qualname__ = f"{name}_{suffix}"
    # The rules below refer to these names, so they call the custom_vjp versions.
    forward, input_grad, kernel_grad = map(jax.custom_vjp, (forward, input_grad, kernel_grad))

    def forward_bwd(res, c):
        x, kernel = res
        return input_grad(c, kernel), kernel_grad(x, c)

    def input_grad_bwd(res, c):
        g, kernel = res
        return forward(c, kernel), kernel_grad(c, g)

    def kernel_grad_bwd(res, c):
        x, g = res
        return input_grad(g, c), forward(x, c)

    # Each residual is the pair of inputs: the products are bilinear.
    forward.defvjp(lambda x, kernel: (forward(x, kernel), (x, kernel)), forward_bwd)
    input_grad.defvjp(lambda g, kernel: (input_grad(g, kernel), (g, kernel)), input_grad_bwd)
    kernel_grad.defvjp(lambda x, g: (kernel_grad(x, g), (x, g)), kernel_grad_bwd)
    return ConvProducts(forward, input_grad, kernel_grad)


#: XLA's convolutions whose derivatives of every order are canonical (fast) convolutions.
CANONICAL = closed_under_vjp(ConvProducts(conv_forward, conv_input_grad, conv_kernel_grad), "canonical")
#: ``conv_forward`` whose derivatives of every order are canonical convolutions (reverse mode only).
canonical_conv = CANONICAL.forward
#: ``conv_input_grad`` with canonical-convolution derivatives.
canonical_input_grad = CANONICAL.input_grad
#: ``conv_kernel_grad`` with canonical-convolution derivatives.
canonical_kernel_grad = CANONICAL.kernel_grad


def conv2d_valid(x: jax.Array, kernel: jax.Array, impl: str = "xla") -> jax.Array:
    """Cross-correlation, VALID padding, stride 1: (B,H,W,Ci) * (kh,kw,Ci,Co) -> (B,H',W',Co).

    ``impl``: ``"xla"`` (``lax.conv_general_dilated``, XLA's own derivatives,
    forward and reverse mode), ``"canonical"`` (the same convolution with the
    custom_vjp rules above: reverse mode to any order, no forward mode),
    ``"im2col"`` (patches + one matmul, plain autodiff) or ``"onednn"``
    (``"canonical"``'s rules with oneDNN computing the float32 products on CPU,
    ``jax_impl.onednn_conv``; pass it through ``resolve_conv_impl`` first).
    """
    kh, kw, ci, co = kernel.shape
    if impl == "im2col":
        patches = extract_patches(x, kh, kw)  # (B, H', W', kh*kw*Ci)
        return patches @ kernel.reshape(kh * kw * ci, co)
    if impl == "canonical":
        return canonical_conv(x, kernel)
    if impl == "onednn":
        from jax_impl import onednn_conv  # lazy: it imports this module

        return onednn_conv.onednn_conv(x, kernel)
    return conv_forward(x, kernel)


class Conv2D(nn.Module):
    """``nn.Conv(features, (k, k), padding="VALID")`` with a choice of algorithm.

    Parameters are ``kernel`` (k, k, C_in, features) and ``bias`` (features,),
    the same tree as ``flax.linen.Conv``. ``impl`` is ``"auto"`` (the faster
    one for the backend: ``"canonical"`` on CPU, ``"xla"`` elsewhere),
    ``"xla"``, ``"canonical"``, ``"im2col"`` or ``"onednn"`` (opt-in: oneDNN's
    CPU kernels for float32, ``jax_impl.onednn_conv``; ``"canonical"`` where
    it cannot run); see ``conv2d_valid``. All give the same numbers up to
    float rounding. ``"canonical"`` supports reverse
    mode to any order (``grad`` of ``grad``) but not forward mode
    (``jax.jvp``, ``jax.hessian``): pass ``impl="xla"`` for those.
    """

    features: int
    kernel_size: int = 5
    impl: str = "auto"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c_in = self.kernel_size, x.shape[-1]
        init = torch_default_uniform(k * k * c_in)
        kernel = self.param("kernel", init, (k, k, c_in, self.features), self.param_dtype)
        bias = self.param("bias", init, (self.features,), self.param_dtype)
        y = conv2d_valid(x, kernel.astype(x.dtype), resolve_conv_impl(self.impl))
        return y + bias.astype(x.dtype)


class Dense(nn.Module):
    """``nn.Dense`` with PyTorch's default initialisation (same ``kernel``/``bias`` tree)."""

    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = torch_default_uniform(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", init, (self.features,), self.param_dtype)
        return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


def pool_windows(x: jax.Array) -> jax.Array:
    """The 2x2 windows of ``x`` as two extra axes: (B, H, W, C) -> (B, H//2, 2, W//2, 2, C).

    Floor mode: an odd last row or column is dropped (its gradient is zero).
    """
    b, h, w, c = x.shape
    return x[:, : h - h % 2, : w - w % 2, :].reshape(b, h // 2, 2, w // 2, 2, c)


def first_max_and_mask(windows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Max of each window and a one-hot mask of the *first* maximal entry.

    ``windows`` is ``pool_windows(x)``. The four candidates are scanned in
    row-major order (top-left, top-right, bottom-left, bottom-right) and a
    later one wins only if it is strictly greater (or NaN), exactly like
    PyTorch's CPU and CUDA kernels. Returns ``(best (B, H/2, W/2, C), mask
    (B, H/2, 2, W/2, 2, C) bool)``; all elementwise, so XLA fuses it.
    """
    candidates = [windows[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)]
    best, index = candidates[0], jnp.zeros(candidates[0].shape, jnp.int8)
    for k, c in enumerate(candidates[1:], start=1):
        take = (c > best) | jnp.isnan(c)
        best = jnp.where(take, c, best)
        index = jnp.where(take, jnp.int8(k), index)
    window_position = jnp.arange(4, dtype=jnp.int8).reshape(1, 1, 2, 1, 2, 1)  # row-major (i, j)
    return best, index[:, :, None, :, None, :] == window_position


@jax.custom_jvp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, floor mode: (B, H, W, C) -> (B, H//2, W//2, C).

    The gradient goes to the *first* maximum of each window (row-major), which
    is what PyTorch's ``MaxPool2d`` does on ties (``jnp.max`` over the window
    would split it between tied entries instead), and NaN wins like in PyTorch.

    Derivative (``custom_jvp``, so forward and reverse mode of any order
    work): with ``m`` the one-hot first-maximum mask, which is locally
    constant, ``dy = sum_window m * dx``. Its transpose, the backward pass, is
    one elementwise ``where(m, broadcast(ct), 0)`` written straight into the
    input's layout, and the second derivative has the same form. XLA's own
    derivative of a chain of strided slices and ``where`` instead materialises
    one zero-padded full-size array per window position and adds them up.
    """
    return first_max_and_mask(pool_windows(x))[0]


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    best, mask = first_max_and_mask(pool_windows(x))
    # where, not mask * dx: 0 * inf would be NaN.
    return best, jnp.sum(jnp.where(mask, pool_windows(dx), 0), axis=(2, 4))
