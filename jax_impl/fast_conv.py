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

as a composition whose derivatives stay fast convolutions
(``jax_impl.conv_general.conv_explicit``, whose docstring has the steps):
the padding made explicit, the kernel dilated, the strides as stride-1
convolutions of the input's phases (or of its space-to-depth stack), and
the project's VALID stride-1 convolution, whose derivative rules are closed
under differentiation (oneDNN's or XLA's convolutions, or patches and one
matmul for 1x1 kernels and small outputs).

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
from jax_impl.conv_general import (
    IM2COL_MAX_OUTPUT_PIXELS,
    POLYPHASE_MIN_CHANNELS,
    conv_explicit,
    dilate_kernel,
    explicit_padding,
    grouped_products,
    polyphase_conv,
    space_to_depth,
)

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

