"""Fast derivatives of every order for any ``flax.linen.Conv``, without touching the model.

XLA's CPU runtime differentiates a convolution into convolutions it runs
slowly: the input gradient is a window-reversed convolution (a naive loop,
~2 GFLOP/s), and a strided convolution's derivatives are *lhs-dilated*
convolutions, slower still (3x3, 64->64, batch 8, 32x32: the gradient of
``||dL/dx||^2`` took 16 ms at stride 1 and 72 ms at stride 2). The penalised
step differentiates twice, so a user's ResNet pays this on every layer.

``fast_convolutions()`` is a context manager (``flax.linen.intercept_methods``)
under which every ``nn.Conv.__call__`` (1-D or 2-D) computes the same
function as written by flax,

    y = conv(pad(x), kernel, strides, kernel_dilation, feature_group_count) + bias,

as a composition whose derivatives stay fast convolutions:

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

Parameters are created exactly as ``nn.Conv`` creates them (names, shapes,
initialisers, ``param_dtype``; inputs, kernel and bias promoted by the
module's ``promote_dtype`` with its ``dtype``), so variables move freely
between the intercepted and the plain model, and the values agree with
flax's up to float rounding (float64: 1e-12). Anything else falls back to
flax's own ``__call__`` unchanged: ``input_dilation`` != 1, a ``mask``, 3-D
and higher convolutions, a ``conv_general_dilated`` override, subclasses
that override ``__call__``, ``nn.ConvLocal``, ``nn.ConvTranspose``,
non-float inputs. Like the project's ``"canonical"`` convolutions, the
intercepted ones support reverse mode to any order but not forward mode
(``jax.jvp``, ``jax.hessian``): leave the context for those.

``jax_impl.penalized_loss`` runs inside ``fast_convolutions()`` on CPU by
default (its ``fast_convolutions=False`` turns it off); a user's own step::

    with jax_impl.fast_convolutions():
        grads = jax.grad(my_penalised_loss)(params, x, y)   # traced inside

It acts while a function is traced: ``jax.jit`` caches a program by function
and argument shapes, not by this context, so trace (call a jitted function
the first time) inside it; ``penalized_loss`` enters it itself. Its
interceptor computes the convolution and does not call the ones entered
inside it: enter other interceptors that must see ``nn.Conv`` calls (capture
by path, ``jax_impl.capture``) outside it, as ``penalized_loss`` does.

``flax.nnx.Conv`` gets the same computation (``nnx_conv_call``, the same
cases by ``intercepts``) from ``jax_impl.nnx.fast_convolutions(model)``
(NNX has no method interceptors: the convolutions' classes are swapped for
subclasses for the duration), which ``jax_impl.nnx.penalized_loss`` enters
on CPU by default on the copy of the model it runs.

Tiny channel widths: no crossover where XLA's own convolutions win was found
(penalised gradient, ``layers="input"``, of three 3x3 SAME convolutions,
float32, 2-core EPYC under load 4-6, medians of interleaved rounds, ms;
fast path / flax's): batch 8 at 32x32, widths 4, 8, 16, 32: 6.9/15.3,
6.4/13.0, 18.9/28.3, 41.9/50.7; the middle one strided 2, widths 2-32:
2.5/4.0 ... 13.8/40.8; batch 1 at 16x16, widths 2, 32: 0.52/0.58, 1.54/1.92.
Only at 8x8 inputs (the patches route), widths 32 and 64: 2.9/2.5, 8.4/8.0.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen.linear import canonicalize_padding

from jax_impl import layers

__all__ = [
    "IM2COL_MAX_OUTPUT_PIXELS",
    "POLYPHASE_MIN_CHANNELS",
    "conv_explicit",
    "dilate_kernel",
    "explicit_padding",
    "fast_convolutions",
    "grouped_products",
    "intercepts",
    "nnx_conv_call",
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


def _as_tuple(value: int | Sequence[int] | None, rank: int) -> tuple[int, ...]:
    """Flax's ``maybe_broadcast``: ``None`` -> 1, an int -> (int,) * rank."""
    value = 1 if value is None else value
    return (value,) * rank if isinstance(value, int) else tuple(value)


#: Attribute set (True) on a ``__call__`` that wraps (``functools.wraps``) the one of the class it
#: subclasses and passes its computation through: ``jax_impl.nnx``'s hooks (capture by path, which
#: add a perturbation to the output, and this module's fast path).
PASSES_CALL_THROUGH = "_agp_passes_call_through"


def _calls_flax(cls: type, base: type) -> bool:
    """Whether instances of ``cls`` compute ``base.__call__``: ``cls`` keeps it, or only ``jax_impl.nnx``'s
    hooks wrap it (``PASSES_CALL_THROUGH``; any other override, decorated or not, is the user's own)."""
    return inspect.unwrap(cls.__call__, stop=lambda f: not getattr(f, PASSES_CALL_THROUGH, False)) \
        is base.__call__


def intercepts(module: nn.Module | nnx.Module, inputs: Any) -> bool:
    """Whether the fast path computes ``module(inputs)`` itself (else flax's ``__call__`` runs).

    True for a ``flax.linen.Conv`` (under ``fast_convolutions``) or a
    ``flax.nnx.Conv`` (under ``jax_impl.nnx.fast_convolutions``), or a
    subclass that keeps its ``__call__``, with a 1-D or 2-D kernel, no
    ``input_dilation``, no ``mask``, flax's own convolution function (Linen:
    no ``conv_general_dilated`` override; NNX: ``lax.conv_general_dilated``
    and no ``preferred_element_type``), float inputs (any number of batch
    axes, none included), channels divisible by ``feature_group_count``, a
    padding form flax accepts, and ``precision=None`` off CPU (on CPU,
    where float32 is always computed in full, ``precision`` is ignored).
    """
    if isinstance(module, nn.Conv):
        if type(module).__call__ is not nn.Conv.__call__ or module.conv_general_dilated is not None \
                or module.conv_general_dilated_cls is not None:
            return False
        features = module.features
    elif isinstance(module, nnx.Conv):
        if not _calls_flax(type(module), nnx.Conv) or module.preferred_element_type is not None \
                or module.conv_general_dilated is not jax.lax.conv_general_dilated:
            return False
        features = module.out_features
    else:
        return False
    if module.mask is not None:
        return False
    rank = 1 if isinstance(module.kernel_size, int) else len(module.kernel_size)
    if rank not in (1, 2) or any(d != 1 for d in _as_tuple(module.input_dilation, rank)):
        return False
    if not isinstance(inputs, jax.Array | np.ndarray) or inputs.ndim < rank + 1:
        return False
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
        return False
    groups = module.feature_group_count
    if inputs.shape[-1] % groups or features % groups:
        return False  # flax's own call raises its error
    if isinstance(module, nnx.Conv) and inputs.shape[-1] // groups != module.kernel_shape[-2]:
        return False  # the kernel was built for other channels: flax's own call raises its error
    if module.precision is not None and jax.default_backend() != "cpu":
        return False  # only XLA's CPU convolutions ignore ``precision`` (float32 is computed in full)
    try:
        canonicalize_padding(module.padding, rank)
    except (ValueError, TypeError):
        return False
    return not (module.padding == "CAUSAL" and rank != 1)


def _geometry(module: nn.Conv | nnx.Conv) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(kernel_size, strides, kernel_dilation)`` of a Linen or NNX ``Conv`` as tuples of its rank."""
    kernel_size = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    rank = len(kernel_size)
    return kernel_size, _as_tuple(module.strides, rank), _as_tuple(module.kernel_dilation, rank)


def _conv_flat(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None, module: nn.Conv | nnx.Conv, impl: Any
) -> jax.Array:
    """(B, *spatial, C) -> (B, *spatial', O): the convolution of ``module`` (its geometry, padding and
    groups) with ``kernel`` and ``bias`` already promoted, by ``conv_explicit``."""
    kernel_size, strides, dilation = _geometry(module)
    rank = len(kernel_size)
    mode, pads = explicit_padding(module.padding, x.shape[1:-1], kernel_size, strides, dilation)
    if rank == 1:  # a 1-D convolution is a 2-D one over a unit height
        x, kernel = x[:, None], kernel[None]
        strides, dilation, pads = (1, *strides), (1, *dilation), ((0, 0), *pads)
    y = conv_explicit(x, kernel, strides=strides, padding=(mode, pads), kernel_dilation=dilation,
                      feature_group_count=module.feature_group_count, impl=impl)  # (B, [1,] Ho, Wo, O)
    if rank == 1:
        y = y[:, 0]
    return y if bias is None else y + bias


def _flatten_batch(inputs: jax.Array, rank: int) -> tuple[tuple[int, ...], jax.Array]:
    """``(batch_shape, x)``: the batch axes of ``inputs`` (none, one or several) flattened into one, as
    flax does (``x`` is (B, *spatial, C))."""
    batch_shape = inputs.shape[: inputs.ndim - rank - 1]
    return batch_shape, inputs.reshape((-1, *inputs.shape[len(batch_shape):]))


def _conv_call(module: nn.Conv, inputs: jax.Array, impl: Any) -> jax.Array:
    """``nn.Conv.__call__`` computed with ``conv_explicit`` (same parameters, same values)."""
    kernel_size = _geometry(module)[0]
    batch_shape, x = _flatten_batch(inputs, len(kernel_size))
    groups, in_features = module.feature_group_count, x.shape[-1]
    kernel_shape = (*kernel_size, in_features // groups, module.features)
    kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
    bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype) \
        if module.use_bias else None
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    y = _conv_flat(x, kernel, bias, module, impl)
    return y.reshape(batch_shape + y.shape[1:])


def nnx_conv_call(module: nnx.Conv, inputs: jax.Array, impl: Any = "auto") -> jax.Array:
    """``nnx.Conv.__call__(module, inputs)`` computed with ``conv_explicit``: same values, fast derivatives.

    For a module and inputs that ``intercepts`` accepts; reads the module's
    ``kernel`` and ``bias`` and promotes them with the inputs as flax does
    (``promote_dtype((x, kernel, bias), dtype=module.dtype)``). ``impl``: as
    in ``fast_convolutions`` (resolve it outside traced code).
    """
    batch_shape, x = _flatten_batch(inputs, len(_geometry(module)[0]))
    bias = module.bias[...] if module.bias is not None else None
    x, kernel, bias = module.promote_dtype((x, module.kernel[...], bias), dtype=module.dtype)
    y = _conv_flat(x, kernel, bias if module.use_bias else None, module, impl)
    return y.reshape(batch_shape + y.shape[1:])


def _interceptor(impl: Any):
    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or len(args) != 1 or kwargs \
                or not intercepts(context.module, args[0]):
            return next_fun(*args, **kwargs)
        return _conv_call(context.module, args[0], impl)

    return intercept


@contextlib.contextmanager
def fast_convolutions(enabled: bool | None = None, *, impl: Any = "auto") -> Iterator[None]:
    """Within this context every ``flax.linen.Conv`` call has fast derivatives (module docstring).

    ``enabled``: ``None`` (default) turns it on where JAX's default backend is
    the CPU (XLA's GPU and TPU convolutions differentiate fast already),
    ``True``/``False`` on/off everywhere. ``impl`` is the project's
    convolution for the ungrouped stride-1 products (``"auto"``: the
    project's default, ``"canonical"``, ``"onednn"``; see
    ``layers.resolve_conv_impl``). Models trace to the same values, and their
    parameters are unchanged; only the traced program differs::

        with fast_convolutions():
            (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    """
    if enabled is None:
        enabled = jax.default_backend() == "cpu"
    if not enabled:
        yield
        return
    # Resolved here, once, not while each convolution is traced (it may load oneDNN's library).
    with nn.intercept_methods(_interceptor(layers.resolve_conv_impl(impl))):
        yield

