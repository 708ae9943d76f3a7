"""Any 1-D/2-D convolution (padding, strides, kernel dilation, groups) as VALID stride-1 products.

``conv_explicit`` computes ``lax.conv_general_dilated`` (NHWC, HWIO, no input
dilation),

    y = conv(pad(x), kernel, strides, kernel_dilation, feature_group_count),

as a composition whose derivatives of every order (reverse mode) stay fast
convolutions, pads, slices and reshapes:

1. ``pad``: every padding flax accepts (``"SAME"``, ``"VALID"``,
   ``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"``, ints, pairs, negative pairs)
   made explicit (``lax.pad`` / ``jnp.pad``, whose derivatives are slices);
2. ``kernel_dilation`` d: the kernel with d-1 zeros between its taps
   (``lax.pad`` with interior padding): ``k_d[d*i, d*j] = k[i, j]``;
3. ``strides`` s: only the kept outputs are computed, by stride-1
   convolutions of the input's phases ``x[:, p::s, q::s]``: one per phase
   with the kernel's taps of that phase, ``k[p::s, q::s]``, summed
   (``polyphase_conv``), or, for few input channels, one of the phases
   stacked as channels (space-to-depth, ``X'[b, h, w, (g, p, q, c)] =
   x[b, s*h + p, s*w + q, (g, c)]``) with ``K'[i, j, (p, q, c), o] =
   k[s*i + p, s*j + q, c, o]``, zero past the kernel. A kernel of extent 1
   along a strided axis (the 1x1 shortcut of a ResNet) slices the input
   instead: ``x[:, ::s]``. (Slicing a stride-1 output would compute s^2
   times the outputs);
4. the VALID stride-1 convolution: the project's
   (``layers.conv2d_valid(x, k, impl)`` with a ``layers.ConvImpl``: XLA's
   convolutions or oneDNN's, with derivative rules closed under
   differentiation), patches and one matmul (``"im2col"``) for 1x1 kernels
   and small outputs (``IM2COL_MAX_OUTPUT_PIXELS``), and for
   ``feature_group_count`` g > 1 the grouped products below with the same
   rules (``layers.closed_under_vjp``).

``jax_impl.fast_conv`` routes ``flax.linen.Conv`` and ``flax.nnx.Conv`` calls here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from jax_impl import layers

__all__ = [
    "IM2COL_MAX_OUTPUT_PIXELS",
    "POLYPHASE_MIN_CHANNELS",
    "conv_explicit",
    "dilate_kernel",
    "explicit_padding",
    "grouped_products",
    "polyphase_conv",
    "space_to_depth",
]

Pads = tuple[tuple[int, int], ...]


def explicit_padding(
    padding: Any, spatial: Sequence[int], kernel_size: Sequence[int], strides: Sequence[int],
    kernel_dilation: Sequence[int],
) -> tuple[str, Pads]:
    """``(mode, ((lo, hi), ...))`` that pads the spatial axes as ``nn.Conv(padding=padding)`` does.

    ``mode`` is ``"constant"`` (zeros; pairs may be negative: crops),
    ``"wrap"`` (``"CIRCULAR"``) or ``"reflect"`` (``"REFLECT"``).
    ``"SAME"``/``"SAME_LOWER"``/``"VALID"`` follow ``lax.padtype_to_pads``
    with the dilated kernel ``(k - 1) * d + 1`` and the strides, as
    ``lax.conv_general_dilated`` does; ``"CIRCULAR"``/``"REFLECT"`` pad
    ``((k_d - 1) // 2, k_d // 2)``; ``"CAUSAL"`` (1-D) pads ``(k_d - 1, 0)``.
    Raises ``ValueError`` for a form flax rejects.
    """
    rank = len(kernel_size)
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
    lax_padding = canonicalize_padding(padding, rank)
    if isinstance(lax_padding, str):  # the names flax handles itself are case-sensitive there
        if lax_padding in ("CIRCULAR", "REFLECT"):
            mode = "wrap" if lax_padding == "CIRCULAR" else "reflect"
            return mode, tuple(((k - 1) // 2, k // 2) for k in dilated)
        if lax_padding == "CAUSAL":
            if rank != 1:
                raise ValueError("padding='CAUSAL' is only defined for 1-D convolutions")
            return "constant", ((dilated[0] - 1, 0),)
        pads = jax.lax.padtype_to_pads(tuple(spatial), tuple(dilated), tuple(strides), lax_padding)
        return "constant", tuple((int(lo), int(hi)) for lo, hi in pads)
    return "constant", tuple((int(lo), int(hi)) for lo, hi in lax_padding)


def _pad_spatial(x: jax.Array, mode: str, pads: Pads) -> jax.Array:
    """Pad the spatial axes of ``x`` (B, *spatial, C); zero padding may be negative (a crop)."""
    if all(p == (0, 0) for p in pads):
        return x
    if mode == "constant":
        config = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
        return jax.lax.pad(x, jnp.zeros((), x.dtype), config)
    return jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=mode)


def dilate_kernel(kernel: jax.Array, dilation: Sequence[int]) -> jax.Array:
    """(kh, kw, I, O) -> ((kh-1)*dh+1, (kw-1)*dw+1, I, O) with ``d - 1`` zeros between taps."""
    if all(d == 1 for d in dilation):
        return kernel
    config = [(0, 0, d - 1) for d in dilation] + [(0, 0, 0), (0, 0, 0)]
    return jax.lax.pad(kernel, jnp.zeros((), kernel.dtype), config)


def _fit(x: jax.Array, axis: int, size: int) -> jax.Array:
    """``x`` cropped or zero-padded at the end of ``axis`` to ``size``."""
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (0, size - x.shape[axis], 0)
    return x if size == x.shape[axis] else jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def space_to_depth(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], groups: int
) -> tuple[jax.Array, jax.Array]:
    """A VALID strided convolution as a VALID stride-1 one: ``conv_s(x, k) == conv_1(X', K')``.

    (B, H, W, C), (kh, kw, C/g, O) -> X' (B, Ho-1+qh, Wo-1+qw, sh*sw*C),
    K' (qh, qw, sh*sw*C/g, O) with ``q = ceil(k / s)`` and
    ``Ho = (H - kh) // sh + 1``:
    ``X'[b, h, w, (g, p, q, c)] = x[b, sh*h + p, sw*w + q, (g, c)]`` and
    ``K'[i, j, (p, q, c), o] = k[sh*i + p, sw*j + q, c, o]`` (zero for taps
    past the kernel), so ``y[b, h, w, o] = sum_{i, j, c} x[b, sh*h + i, sw*w +
    j, c] k[i, j, c, o]`` is unchanged; channels stay grouped by ``g``
    outermost, so a grouped convolution stays grouped. The input is cropped
    (or zero-padded, where only zero taps read) to ``s * (Ho - 1 + q)`` rows.
    """
    (sh, sw), (b, h, w, c), (kh, kw, cig, co) = strides, x.shape, kernel.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    qh, qw = -(-kh // sh), -(-kw // sw)
    x = _fit(_fit(x, 1, sh * (ho - 1 + qh)), 2, sw * (wo - 1 + qw))
    x = x.reshape(b, ho - 1 + qh, sh, wo - 1 + qw, sw, groups, c // groups)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6).reshape(b, ho - 1 + qh, wo - 1 + qw, sh * sw * c)
    kernel = jnp.pad(kernel, ((0, qh * sh - kh), (0, qw * sw - kw), (0, 0), (0, 0)))
    kernel = kernel.reshape(qh, sh, qw, sw, cig, co).transpose(0, 2, 1, 3, 4, 5)
    return x, kernel.reshape(qh, qw, sh * sw * cig, co)


def polyphase_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], conv) -> jax.Array:
    """A VALID strided convolution as a sum of stride-1 ones, one per phase: no zero taps.

    ``y = sum_{p, q} conv(x[:, p::sh, q::sw], k[p::sh, q::sw])`` (each phase
    cropped to the rows its taps read): tap ``(sh*i + p, sw*j + q)`` of the
    kernel only ever reads input phase ``(p, q)``.
    """
    (sh, sw), (_, h, w, _), (kh, kw) = strides, x.shape, kernel.shape[:2]
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    y = None
    for p in range(min(sh, kh)):
        for q in range(min(sw, kw)):
            k_pq = kernel[p::sh, q::sw]  # (ceil((kh-p)/sh), ceil((kw-q)/sw), C/g, O)
            a, b = k_pq.shape[:2]
            x_pq = x[:, p: p + sh * (ho + a - 2) + 1: sh, q: q + sw * (wo + b - 2) + 1: sw]  # (B, ho+a-1, .)
            term = conv(x_pq, k_pq)  # (B, ho, wo, O)
            y = term if y is None else y + term
    return y


def _slice_unit_axes(x: jax.Array, kernel: jax.Array, strides: Sequence[int]) -> tuple[jax.Array, list[int]]:
    """Apply the stride of every axis where the kernel has extent 1 to the input (``x[:, ::s]``).

    A 1-tap axis reads only the kept positions, so slicing first is exact
    and wastes nothing; returns the input and the strides left to apply.
    """
    left = list(strides)
    for axis, (k, s) in enumerate(zip(kernel.shape[:2], strides, strict=True)):
        if k == 1 and s > 1:
            n = (x.shape[axis + 1] - 1) // s + 1
            index = [slice(None)] * x.ndim
            index[axis + 1] = slice(0, (n - 1) * s + 1, s)
            x, left[axis] = x[tuple(index)], 1
    return x, left


def _grouped_forward(x, kernel, groups):
    """(B, H, W, C), (kh, kw, C/g, O) -> (B, H', W', O): VALID stride-1, ``g`` feature groups."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=layers.CONV_DIMENSIONS,
                                        feature_group_count=groups)


def _grouped_input_grad(ct, kernel, groups):
    """``d <y, ct> / d x`` of ``_grouped_forward``: (B, H', W', O), (kh, kw, C/g, O) -> (B, H, W, C).

    Per group, ``layers.conv_input_grad``: a full correlation with the
    flipped kernel whose in/out features are swapped within each group,
    ``K~[i, j, o', (g, c)] = k[kh-1-i, kw-1-j, c, (g, o')]``.
    """
    kh, kw, cig, co = kernel.shape
    flipped = jnp.flip(kernel, (0, 1)).reshape(kh, kw, cig, groups, co // groups)
    flipped = flipped.transpose(0, 1, 4, 3, 2).reshape(kh, kw, co // groups, groups * cig)
    return jax.lax.conv_general_dilated(ct, flipped, (1, 1), ((kh - 1, kh - 1), (kw - 1, kw - 1)),
                                        dimension_numbers=layers.CONV_DIMENSIONS, feature_group_count=groups)


def _grouped_kernel_grad(x, ct, groups):
    """``d <y, ct> / d kernel`` of ``_grouped_forward``: (B, H, W, C), (B, H', W', O) -> (kh, kw, C/g, O).

    ``layers.conv_kernel_grad`` with the channels of ``x`` (its "batch" axis
    there) and the outputs split into ``g`` matching groups (``batch_group_count``).
    """
    return jax.lax.conv_general_dilated(x, ct, (1, 1), "VALID", dimension_numbers=("CHWN", "IHWO", "HWNC"),
                                        batch_group_count=groups)


@functools.cache
def grouped_products(groups: int) -> layers.ConvProducts:
    """The three VALID stride-1 products with ``groups`` feature groups, closed under differentiation.

    ``forward(x, k)``, ``input_grad(ct, k)``, ``kernel_grad(x, ct)`` as in
    ``jax_impl.layers`` (same table of derivatives), with ``x`` (B, H, W, C),
    ``k`` (kh, kw, C/groups, O) and output channel ``o`` reading input group
    ``o // (O / groups)`` (``lax``'s ``feature_group_count``).
    """
    products = layers.ConvProducts(
        functools.partial(_grouped_forward, groups=groups),
        functools.partial(_grouped_input_grad, groups=groups),
        functools.partial(_grouped_kernel_grad, groups=groups),
    )
    return layers.closed_under_vjp(products, f"grouped{groups}")


#: Output pixels (Ho * Wo) up to which an ungrouped convolution runs as patches and one matmul.
#: Measured (2-core EPYC, batch 8, gradient of ||d tanh(conv) / dx||^2, ms): 3x3 512->512 at 2x2:
#: im2col 40, oneDNN 125, XLA (canonical) 950, flax 750; 3x3 128->128 at 8x8: 15, 24, 40, 30;
#: 3x3 64->64 at 16x16: 42, 27, 29, 29. Small images leave the convolution kernels little to tile
#: over, and the patches are small there.
IM2COL_MAX_OUTPUT_PIXELS = 64
#: Input channels (per group) from which a strided convolution runs as one convolution per phase
#: (``polyphase_conv``) instead of one space-to-depth convolution. Measured as above (ms, 3x3 stride 2):
#: 64->128 at 32x32, batch 32: phases 163, space-to-depth 176; 128->256 at 16x16: 214, 327; the 7x7
#: stem on 3 channels at 64x64, batch 8: 23, 20 (few channels: space-to-depth's 4x wider input helps).
POLYPHASE_MIN_CHANNELS = 16


def _valid_conv(x: jax.Array, kernel: jax.Array, groups: int, impl: Any) -> jax.Array:
    """VALID stride-1 convolution with fast derivatives of every order (module docstring, step 4).

    Patches and one matmul (``"im2col"``, plain autodiff: slices, pads,
    matmuls at every order) for 1x1 kernels and small outputs
    (``IM2COL_MAX_OUTPUT_PIXELS``), ``impl`` for the rest.
    """
    if groups > 1:
        return grouped_products(groups).forward(x, kernel)
    (kh, kw), (h, w) = kernel.shape[:2], x.shape[1:3]
    if kh * kw == 1 or (h - kh + 1) * (w - kw + 1) <= IM2COL_MAX_OUTPUT_PIXELS:
        impl = "im2col"
    return layers.conv2d_valid(x, kernel, impl)


def conv_explicit(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int],
    padding: tuple[str, Pads],
    kernel_dilation: Sequence[int],
    feature_group_count: int = 1,
    impl: Any = "auto",
) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO, no input dilation) as pad + stride-1 VALID convolution.

    (B, H, W, C), (kh, kw, C/g, O) -> (B, Ho, Wo, O). ``padding`` is
    ``explicit_padding``'s ``(mode, pads)``; ``impl`` is the project's
    convolution (a ``ConvImpl`` or its name, ``layers.resolve_conv_impl``;
    resolve it outside traced code) for ungrouped convolutions.
    Same values as ``lax.conv_general_dilated(x, kernel, strides, pads,
    rhs_dilation=kernel_dilation, feature_group_count=g)``; its derivatives
    of every order (reverse mode) are stride-1 VALID convolutions, pads,
    slices and reshapes.
    """
    x = _pad_spatial(x, *padding)  # (B, H+lo+hi, W+lo+hi, C)
    kernel = dilate_kernel(kernel, kernel_dilation)  # (kh_d, kw_d, C/g, O)
    x, strides = _slice_unit_axes(x, kernel, strides)
    if any(s > 1 for s in strides) and kernel.shape[2] >= POLYPHASE_MIN_CHANNELS:
        return polyphase_conv(x, kernel, tuple(strides),
                              functools.partial(_valid_conv, groups=feature_group_count, impl=impl))
    if any(s > 1 for s in strides):
        x, kernel = space_to_depth(x, kernel, tuple(strides), feature_group_count)  # (B, Ho-1+q, ., s*s*C)
    return _valid_conv(x, kernel, feature_group_count, impl)  # (B, Ho, Wo, O)
