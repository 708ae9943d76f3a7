"""The three convolution products of the seed's ``Conv2D`` and their derivative rules (XLA's kernels).

VALID padding, stride 1, NHWC activations, HWIO kernel; ``H' = H - kh + 1``,
``W' = W - kw + 1``::

    conv_forward(x, k)       (B,H,W,Ci), (kh,kw,Ci,Co)   -> (B,H',W',Co)
        y[b,h,w,o]  = sum_{i,j,c} x[b,h+i,w+j,c] k[i,j,c,o]
    conv_input_grad(ct, k)   (B,H',W',Co), (kh,kw,Ci,Co) -> (B,H,W,Ci)
        dx[b,h,w,c] = sum_{i,j,o} ct[b,h-i,w-j,o] k[i,j,c,o]
    conv_kernel_grad(x, ct)  (B,H,W,Ci), (B,H',W',Co)    -> (kh,kw,Ci,Co)
        dk[i,j,c,o] = sum_{b,h,w} x[b,h+i,w+j,c] ct[b,h,w,o]

The three are bilinear and close under differentiation (``closed_under_vjp``);
``CANONICAL`` is XLA's products with those rules, ``jax_impl.onednn_conv.ONEDNN``
oneDNN's. Which one a model runs is chosen in ``jax_impl.conv_impl``. This
module imports nothing of the project: both of those build on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "CANONICAL",
    "CONV_DIMENSIONS",
    "ConvProducts",
    "canonical_conv",
    "canonical_input_grad",
    "canonical_kernel_grad",
    "closed_under_vjp",
    "conv_forward",
    "conv_input_grad",
    "conv_kernel_grad",
    "extract_patches",
    "im2col_conv",
]

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


def im2col_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``conv_forward`` as patches and one matmul (plain autodiff).

    (B, H, W, Ci), (kh, kw, Ci, Co) -> (B, H', W', Co).
    """
    kh, kw, ci, co = kernel.shape
    return extract_patches(x, kh, kw) @ kernel.reshape(kh * kw * ci, co)  # (B, H', W', kh*kw*Ci) @ (.., Co)


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
