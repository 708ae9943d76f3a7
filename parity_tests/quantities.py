"""The quantities one forward/backward computes in each framework, and the parity grid of cases.

Cross-framework code (JAX and PyTorch). ``jax_quantities`` and ``torch_quantities`` return
everything ``penalized_loss`` computes (logits, loss, total, penalty, each layer's penalty term,
each activation gradient) and every parameter gradient of the total, under the same keys;
``compare_quantities`` compares two such dicts. :func:`compare_case` runs one :class:`Case` of the
grid (:func:`default_cases`) on identical weights. The other comparisons (``parity_tests.trajectory``,
``parity_tests.ties``, ``parity_tests.seed_answer``) are built on these quantities.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

import torch_ref
from jax_impl import Net, penalized_loss
from parity_tests.harness import (
    Comparison,
    Tolerance,
    compare,
    identical_weights,
    jax_dtype,
    jax_inputs,
    make_batch,
    nchw_to_nhwc,
    to_numpy,
    torch_inputs,
)

Layers = tuple[str, ...] | None

# ------------------------------------------------------------------------ one forward/backward


#: Compiler options under which a GPU computes convolutions of short dyadic fractions exactly, for
#: the max-pool tie cases (``parity_tests.ties.tie_setup``). XLA's GPU autotuner times cuDNN's
#: algorithms and may pick a transform-based one (FFT, Winograd) whose float32 rounding breaks
#: exact ties: with XLA's defaults the float32 tie cases failed in 2 of 5 runs on an H100 and an
#: H200 (at autotune level 1, 11,200 tied pool2 windows became 6,797). With autotuning off XLA
#: takes cuDNN's heuristic choice, which summed them exactly in all 7 runs there (docs/parity.md).
EXACT_CONV_OPTIONS = {"gpu": {"xla_gpu_autotune_level": 0}}


@functools.cache
def _jax_value_and_grad(layers: Layers, conv_impl: str = "auto", exact_convolutions: bool = False):
    """``jit(value_and_grad(penalized_loss))`` for one layer choice, compiled once per shape/dtype.

    The penalty weight is a traced argument, so weights 0 and 10 share a compilation. Compiled
    with plain ``jax.jit``: the grid holds JAX's default kernels to float32's 1e-5. The faster CPU
    kernels of ``jit_options()`` round float32 convolutions less tightly (measured 8.6e-6 relative
    error on relu1's penalty term against float64, 8e-8 with the default kernels); the trajectory
    (``parity_tests.trajectory``) runs them, and tests/test_xla_options.py bounds their error
    against float64.
    """
    model = Net(conv_impl=conv_impl)

    def total(params, x, y, penalty_weight):
        return penalized_loss(params, model, x, y, penalty_weight=penalty_weight, layers=layers)

    options = EXACT_CONV_OPTIONS.get(jax.default_backend()) if exact_convolutions else None
    return jax.jit(jax.value_and_grad(total, has_aux=True), compiler_options=options)


def jax_quantities(params, x_nchw: np.ndarray, y: np.ndarray, penalty_weight: float,
                   layers: Layers = None, conv_impl: str = "auto",
                   exact_convolutions: bool = False) -> dict[str, np.ndarray]:
    """Everything ``penalized_loss`` computes, plus ``jax.grad`` of the total, as NumPy (NHWC).

    ``exact_convolutions``: compile with :data:`EXACT_CONV_OPTIONS` (the tie cases). Call inside
    ``jax_dtype(dtype)``.
    """
    x, y = jax_inputs(x_nchw, y)
    weight = jnp.asarray(penalty_weight, x.dtype)
    (total, aux), grads = _jax_value_and_grad(layers, conv_impl, exact_convolutions)(params, x, y, weight)
    return _quantities(total, aux, grads, activation_layout=np.asarray)


def torch_quantities(net: torch.nn.Module, x_nchw: np.ndarray, y: np.ndarray, penalty_weight: float,
                     layers: Layers = None) -> dict[str, np.ndarray]:
    """The same quantities from ``torch_ref.penalized_loss`` + ``backward()``; activations as NHWC.

    Runs on the device of ``net``'s parameters.
    """
    net.zero_grad(set_to_none=True)
    x, y = torch_inputs(x_nchw, y, device=next(net.parameters()).device)
    total, aux = torch_ref.penalized_loss(net, x, y, penalty_weight, layers)
    total.backward()
    grads = torch_ref.export_flax_params(net, grads=True)
    aux = {
        **{k: to_numpy(aux[k]) for k in ("loss", "penalty", "logits")},
        "penalty_terms": {k: to_numpy(v) for k, v in aux["penalty_terms"].items()},
        "activation_grads": {k: to_numpy(v) for k, v in aux["activation_grads"].items()},
    }
    return _quantities(to_numpy(total), aux, grads, activation_layout=nchw_to_nhwc)


def _quantities(total, aux, grads, activation_layout) -> dict[str, np.ndarray]:
    out = {
        "logits": np.asarray(aux["logits"]),
        "loss": np.asarray(aux["loss"]),
        "penalty": np.asarray(aux["penalty"]),
        "total": np.asarray(total),
    }
    for name, term in aux["penalty_terms"].items():
        out[f"penalty_term[{name}]"] = np.asarray(term)
    for name, grad in aux["activation_grads"].items():
        out[f"activation_grad[{name}]"] = activation_layout(grad)
    for key, grad in traverse_util.flatten_dict(dict(grads), sep=".").items():
        out[f"param_grad[{key}]"] = np.asarray(grad)
    return out


def compare_quantities(dtype: str, actual: dict, expected: dict, case: str = "",
                       tolerance: Tolerance | None = None) -> list[Comparison]:
    """Compare two ``*_quantities`` dicts key by key; their keys must be the same."""
    if set(actual) != set(expected):
        raise ValueError(f"{case}: quantities {sorted(actual)} (JAX) != {sorted(expected)} (PyTorch)")
    return [compare(k, dtype, actual[k], expected[k], tolerance, case) for k in sorted(expected)]


# ---------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Case:
    """One point of the parity grid.

    ``init_batch=None``: PyTorch initialises the weights (exported to Flax);
    an integer: ``jax_impl.Net().init`` on that many images does (loaded into
    PyTorch), and it differs from ``batch`` on purpose.
    """

    dtype: str
    batch: int
    penalty_weight: float = 10.0
    layers: Layers = None
    init_batch: int | None = None
    conv_impl: str = "auto"
    seed: int = 0

    @property
    def name(self) -> str:
        layers = "+".join(self.layers) if self.layers else "relu1+relu2"
        init = "torch" if self.init_batch is None else f"flax@B={self.init_batch}"
        impl = "" if self.conv_impl == "auto" else f" conv={self.conv_impl}"
        return f"{self.dtype} B={self.batch} w={self.penalty_weight:g} {layers} init={init}{impl}"


def default_cases() -> list[Case]:
    """The grid: batch 1 (the seed's), 7, 32; init batch != apply batch; w 0 and 10; each layer alone.

    Not the full product (36 compilations of a few seconds each): every value
    of every axis appears, each axis is varied around the B=7 case, and the
    cases are chosen to share compilations (one per batch size x layer choice
    x dtype; the weight is traced). ``conv_impl="auto"`` (``"canonical"`` on
    CPU, see ``jax_impl.layers.resolve_conv_impl``) is the model users get
    here; one float64 case pins the native XLA convolution (the GPU/TPU
    default) too.
    """
    cases = []
    for dtype in ("float64", "float32"):
        cases += [
            Case(dtype, batch=1),
            Case(dtype, batch=7, init_batch=32),
            Case(dtype, batch=32, init_batch=1),
            Case(dtype, batch=7, layers=("relu1",)),
            Case(dtype, batch=7, layers=("relu2",)),
            Case(dtype, batch=7, penalty_weight=0.0),
            Case(dtype, batch=7, penalty_weight=0.0, layers=("relu2",), init_batch=1),
        ]
    cases.append(Case("float64", batch=7, conv_impl="xla"))
    return cases


def compare_case(case: Case) -> list[Comparison]:
    """All quantities of one case, JAX against PyTorch, on identical weights and inputs."""
    x, y = make_batch(case.seed + 1, case.batch, case.dtype)
    with jax_dtype(case.dtype):
        net, params = identical_weights(case.seed, case.dtype, case.init_batch)
        actual = jax_quantities(params, x, y, case.penalty_weight, case.layers, case.conv_impl)
    expected = torch_quantities(net, x, y, case.penalty_weight, case.layers)
    return compare_quantities(case.dtype, actual, expected, case.name)
