"""Building blocks of the seed CNN, written so that they match PyTorch exactly.

Three pieces live here:

* ``capture(module, name, x)``: the one line a model adds to make ``x`` a
  capture point of the activation gradient penalty (``perturb`` + ``sow``).
* ``Conv2D``: a VALID, stride-1 convolution with the parameter layout of
  ``flax.linen.Conv`` (``kernel`` HWIO, ``bias``) and PyTorch's default
  initialisation, computed either by XLA's native convolution or as
  patch extraction followed by one matmul (``impl``).
* ``max_pool_2x2``: 2x2/stride-2 max pooling whose gradient goes to the
  *first* maximum of each window in row-major order, as PyTorch's
  ``MaxPool2d`` does, and which stays differentiable twice.

Conventions: activations are NHWC; PyTorch is NCHW.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

#: Collection that ``capture`` sows activations into (read them back with
#: ``model.apply(..., mutable=["intermediates"])``).
INTERMEDIATES = "intermediates"
#: Collection that holds the zero perturbations whose gradient is d loss / d a.
PERTURBATIONS = "perturbations"

CONV_IMPLS = ("auto", "xla", "im2col")


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
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def resolve_conv_impl(impl: str) -> str:
    """Map ``"auto"`` to the faster convolution for the default backend.

    On CPU, XLA's convolution gradients are slow and patch-extraction + matmul
    wins (see benchmarks/); on GPU and TPU the native convolution is used.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return impl


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


def conv2d_valid(x: jax.Array, kernel: jax.Array, impl: str = "xla") -> jax.Array:
    """Cross-correlation, VALID padding, stride 1: (B,H,W,Ci) * (kh,kw,Ci,Co) -> (B,H',W',Co)."""
    kh, kw, ci, co = kernel.shape
    if impl == "im2col":
        patches = extract_patches(x, kh, kw)  # (B, H', W', kh*kw*Ci)
        return patches @ kernel.reshape(kh * kw * ci, co)
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


class Conv2D(nn.Module):
    """``nn.Conv(features, (k, k), padding="VALID")`` with a choice of algorithm.

    Parameters are ``kernel`` (k, k, C_in, features) and ``bias`` (features,),
    the same tree as ``flax.linen.Conv``. ``impl`` is ``"auto"``, ``"xla"`` or
    ``"im2col"``; all give the same numbers up to float rounding.
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


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, floor mode: (B, H, W, C) -> (B, H//2, W//2, C).

    The window's four candidates are scanned in row-major order (top-left,
    top-right, bottom-left, bottom-right) and a later one wins only if it is
    strictly greater (or NaN), exactly like PyTorch's CPU and CUDA kernels.
    The gradient of ``where`` therefore flows to the first maximum only, which
    is what ``MaxPool2d`` does on ties; ``jnp.max`` over a reshaped window would
    split it evenly between tied entries instead. Everything is elementwise, so
    XLA fuses it, and the second derivative is as cheap as the first.
    """
    _, h, w, _ = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    candidates = (x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2])
    best = candidates[0]
    for c in candidates[1:]:
        best = jnp.where((c > best) | jnp.isnan(c), c, best)
    return best
