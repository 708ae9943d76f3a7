"""Building blocks of the seed CNN, written so that they match PyTorch exactly.

Three pieces live here:

* ``capture(module, name, x)``: the one line a model adds to make ``x`` a
  capture point of the activation gradient penalty (``perturb`` + ``sow``).
* ``Conv2D``: a VALID, stride-1 convolution with the parameter layout of
  ``flax.linen.Conv`` (``kernel`` HWIO, ``bias``) and PyTorch's default
  initialisation, computed by the ``ConvImpl`` it is given
  (``jax_impl.conv_impl``: XLA's convolution, the same with derivative rules
  that keep every derivative order a fast convolution, those rules with
  oneDNN computing the products, or patches and one matmul; ``"auto"`` picks
  per backend when the layer is built).
* ``max_pool_2x2``: 2x2/stride-2 max pooling whose gradient goes to the
  *first* maximum of each window in row-major order, as PyTorch's
  ``MaxPool2d`` does, and which stays differentiable twice.

The convolution products and their derivative rules live in
``jax_impl.conv_products``, the choice between implementations in
``jax_impl.conv_impl``; their names are re-exported here.

Conventions: activations are NHWC; PyTorch is NCHW.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Re-exported: these lived here before jax_impl.conv_products / jax_impl.conv_impl owned them.
from jax_impl.conv_impl import CONV_IMPLS, ConvImpl, conv2d_valid, resolve_conv_impl
from jax_impl.conv_products import (
    CANONICAL,
    CONV_DIMENSIONS,
    ConvProducts,
    canonical_conv,
    canonical_input_grad,
    canonical_kernel_grad,
    closed_under_vjp,
    conv_forward,
    conv_input_grad,
    conv_kernel_grad,
    extract_patches,
)

__all__ = [
    "CANONICAL",
    "CONV_DIMENSIONS",
    "CONV_IMPLS",
    "INTERMEDIATES",
    "PERTURBATIONS",
    "Conv2D",
    "ConvImpl",
    "ConvProducts",
    "Dense",
    "canonical_conv",
    "canonical_input_grad",
    "canonical_kernel_grad",
    "capture",
    "closed_under_vjp",
    "conv2d_valid",
    "conv_forward",
    "conv_input_grad",
    "conv_kernel_grad",
    "extract_patches",
    "first_max_and_mask",
    "max_pool_2x2",
    "pool_windows",
    "resolve_conv_impl",
    "torch_default_uniform",
]

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


class Conv2D(nn.Module):
    """``nn.Conv(features, (k, k), padding="VALID")`` with a choice of algorithm.

    Parameters are ``kernel`` (k, k, C_in, features) and ``bias`` (features,),
    the same tree as ``flax.linen.Conv``. ``impl`` is a ``ConvImpl`` or its
    name, resolved once when the layer is built (``resolve_conv_impl``):
    ``"auto"`` (oneDNN's kernels on CPU where they are built, else
    ``"canonical"``; ``"xla"`` on GPU/TPU), ``"xla"``, ``"canonical"``,
    ``"im2col"`` or ``"onednn"`` (``"canonical"`` where it cannot run). All
    give the same numbers up to float rounding. ``"canonical"`` and
    ``"onednn"`` support reverse mode to any order (``grad`` of ``grad``) but
    not forward mode (``jax.jvp``, ``jax.hessian``): pass ``impl="xla"`` for those.
    """

    features: int
    kernel_size: int = 5
    impl: str | ConvImpl = "auto"
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # The name becomes a ConvImpl here, when the layer is built, not while __call__ is traced.
        object.__setattr__(self, "impl", resolve_conv_impl(self.impl))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c_in = self.kernel_size, x.shape[-1]
        init = torch_default_uniform(k * k * c_in)
        kernel = self.param("kernel", init, (k, k, c_in, self.features), self.param_dtype)
        bias = self.param("bias", init, (self.features,), self.param_dtype)
        y = self.impl.conv(x, kernel.astype(x.dtype))
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
    # The primal through max_pool_2x2 itself, so that differentiating this rule (the second derivative
    # of the penalised step) meets this rule again; first_max_and_mask's ``best`` would be
    # differentiated as slices and selects, whose transpose is four zero-padded full-size arrays added
    # up (at batch 128 that fusion took 3 ms of the seed CNN's ~85 ms step on a 2-core CPU).
    best = max_pool_2x2(x)
    mask = first_max_and_mask(pool_windows(x))[1]
    # where, not mask * dx: 0 * inf would be NaN. The barrier's transpose makes the backward pass write
    # the input's cotangent once: without it XLA computed that select twice, once for the convolution's
    # bias gradient (a 6-d reduce) and once for its kernel gradient (batch 128 of the seed CNN on a
    # 2-core CPU: a 1.5 ms fusion of a ~70 ms step). Values are unchanged.
    return best, jnp.sum(jnp.where(mask, pool_windows(jax.lax.optimization_barrier(dx)), 0), axis=(2, 4))
