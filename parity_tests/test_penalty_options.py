"""Every penalty option gives the same numbers in jax_impl and torch_ref (seed Net, float64).

Cross-framework (imports JAX and PyTorch). The seed CNN is run at 16x16x1
(relu1 (B, 6, 6, 32), relu2 (B, 1, 1, 64)) to keep the suite fast; the
computation is the same as at 32x32.

The JAX side of the cases is computed once per module, all cases of the
default suite in one program compiled with ``harness.fast_jit`` (``jax_results``):
XLA shares their forward passes, and at this size its optimisation effort only
costs time. One compilation of the six cases took 5 s where op by op (the
earlier way) took ~25 s and six separate compilations ~10 s. Each case is still
compared on its own, against its own PyTorch run.
"""

import functools

import jax
import numpy as np
import pytest
import torch

import torch_ref
from jax_impl import Net, penalized_loss
from parity_tests.harness import fast_jit

# float64 rounding only (~1e-16 per op, through double backprop): 1e-10 leaves >1000x headroom.
RTOL_EXACT = 1e-10
# The finite difference (loss(a + h v) - loss(a)) / h amplifies the frameworks' ~1e-16 rounding
# differences of the loss by |loss| / (h d); measured ~1e-12 at h = 1e-2, so 1e-10 keeps 100x headroom.
RTOL_FD = 1e-10
FD_STEP = 1e-2
BATCH = 4
WEIGHT = 10.0

CASES = {
    "per_example": {"normalization": "per_example"},
    "l2": {"norm": "l2"},
    "l2_per_example": {"norm": "l2", "normalization": "per_example"},
    "layer_weights": {"layer_weights": {"relu1": 0.25, "relu2": 3.0}},
    "input_and_relu2": {"layers": ["input", "relu2"]},
    "input_only": {"layers": "input"},
    "per_example_jacobian": {"normalization": "per_example", "examples_interact": True},
    "fd": {"approx": "finite_difference", "fd_step": FD_STEP},
    "fd_l2_per_example_weighted_input": {
        "approx": "finite_difference", "fd_step": FD_STEP, "norm": "l2", "normalization": "per_example",
        "layers": ["input", "relu1", "relu2"], "layer_weights": {"input": 2.0, "relu2": 0.5},
    },
    "fd_squared_weighted": {
        "approx": "finite_difference", "fd_step": FD_STEP, "layer_weights": {"relu1": 4.0},
    },
}


def normwise(actual, expected, rtol, what):
    """``max|a - b| <= rtol * max|b|`` (see parity_tests/harness.py for why normwise)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.max(np.abs(expected)) if expected.size else 0.0
    err = np.max(np.abs(actual - expected)) if expected.size else 0.0
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:.0e} * {scale:.3e}"


@pytest.fixture(scope="module")
def net_and_batch():
    torch.manual_seed(0)
    tnet = torch_ref.Net(in_channels=1, image_size=16).double()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 1, 16, 16))
    y = rng.integers(0, 10, BATCH)
    return tnet, x, y


def run_torch(tnet, x, y, options):
    tnet.zero_grad()
    options = dict(options)
    layers = options.pop("layers", None)
    if options.get("approx") == "finite_difference":
        options["capture_modules"] = torch_ref.NET_CAPTURE_MODULES
    total, aux = torch_ref.penalized_loss(tnet, torch.tensor(x), torch.tensor(y), WEIGHT, layers, **options)
    total.backward()
    return total, aux, torch_ref.export_flax_params(tnet, grads=True)


def run_jax(params, xj, yj, options):
    """``(total, aux), grads`` of ``penalized_loss`` with ``options`` (NHWC ``xj``)."""

    def f(p):
        return penalized_loss(p, Net(), xj, yj, penalty_weight=WEIGHT, **options)

    return jax.value_and_grad(f, has_aux=True)(params)


# Cases whose formulas another default case already exercises run with -m slow only (suite time).
SLOW_CASES = {"l2", "input_only", "per_example_jacobian", "fd_squared_weighted"}
#: The options of ``test_input_gradient_matches_reference_in_nchw`` (``layers`` as a bare string).
INPUT_GRADIENT_OPTIONS = {"layers": "input"}


@pytest.fixture(scope="module")
def jax_results(net_and_batch):
    """``case -> ((total, aux), grads)`` of ``run_jax``, one compiled program per group of cases.

    The groups are the default suite's cases (plus the input-gradient test's
    options, key ``"input_gradient"``) and ``SLOW_CASES``; a group is
    computed the first time one of its cases is asked for, in float64.
    """
    tnet, x, y = net_and_batch
    # NumPy arguments: the compiled program converts them; jnp.asarray would compile a small
    # program per parameter shape first.
    params = torch_ref.export_flax_params(tnet)
    xj, yj = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y

    @functools.cache
    def group(slow: bool) -> dict:
        options = {c: o for c, o in CASES.items() if (c in SLOW_CASES) == slow}
        if not slow:
            options["input_gradient"] = INPUT_GRADIENT_OPTIONS
        with jax.enable_x64(True):
            compiled = fast_jit(lambda p, xj, yj: {c: run_jax(p, xj, yj, o) for c, o in options.items()})
            return jax.tree.map(np.asarray, compiled(params, xj, yj))

    return lambda case: group(case in SLOW_CASES)[case]


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES]
)
def test_option_matches_reference_float64(case, net_and_batch, jax_results):
    options = CASES[case]
    rtol = RTOL_FD if options.get("approx") == "finite_difference" else RTOL_EXACT
    tnet, x, y = net_and_batch
    total_t, aux_t, grads_t = run_torch(tnet, x, y, options)
    (total_j, aux_j), grads_j = jax_results(case)
    normwise(total_j, total_t.item(), rtol, "total")
    normwise(aux_j["penalty"], aux_t["penalty"].item(), rtol, "penalty")
    assert set(aux_j["penalty_terms"]) == set(aux_t["penalty_terms"])
    for name, term in aux_t["penalty_terms"].items():
        normwise(aux_j["penalty_terms"][name], term.item(), RTOL_EXACT, f"term {name}")
    for layer, tensors in grads_t.items():
        for pname, g in tensors.items():
            normwise(grads_j[layer][pname], g, rtol, f"grad {layer}.{pname}")


def test_input_gradient_matches_reference_in_nchw(net_and_batch, jax_results):
    tnet, x, y = net_and_batch
    _, aux_t, _ = run_torch(tnet, x, y, INPUT_GRADIENT_OPTIONS)
    (_, aux_j), _ = jax_results("input_gradient")
    g_j = np.asarray(aux_j["activation_grads"]["input"]).transpose(0, 3, 1, 2)  # NHWC -> NCHW
    normwise(g_j, aux_t["activation_grads"]["input"].detach().numpy(), RTOL_EXACT, "d loss / d x")


def test_torch_finite_difference_without_hooks_names_the_fix(net_and_batch):
    tnet, x, y = net_and_batch
    with pytest.raises(ValueError, match="capture_modules"):
        torch_ref.penalized_loss(tnet, torch.tensor(x), torch.tensor(y), 1.0, approx="finite_difference")


def test_lazy_regularisation_trains_identically_for_four_steps():
    """Penalty every 2 steps with weight 2w, the plain loss in between: same SGD trajectory (MLP)."""
    from jax_impl import lazy_value_and_grad
    from parity_tests import models_torch
    from parity_tests.models_jax import MLP

    every, lr, steps, shape = 2, 0.1, 4, (1, 4, 4)
    torch.manual_seed(0)
    tnet = models_torch.MLP(16, hidden=(8, 8)).double()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, *shape))
    y = rng.integers(0, 10, BATCH)
    # The MLP flattens its input image; example_input shows the converter that (C, H, W) map
    # (with C = 1 here both flatten orders coincide, but the call stays right for any C).
    example = torch.zeros(1, *shape, dtype=torch.float64)
    params = torch_ref.export_flax_params(tnet, example_input=example)  # NumPy, updated in NumPy below
    xj, yj = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y
    with jax.enable_x64(True):
        # Compiled once with the step traced, as a training loop runs it: op by op, each call's
        # lax.cond (penalty step or plain step) was a new program to compile (~3 s a step).
        # fast_jit: what is compared is lazy regularisation's schedule and weight 2w, not kernels.
        lazy_step = fast_jit(lambda p, step: lazy_value_and_grad(
            p, MLP(hidden=(8, 8)), xj, yj, step=step, every=every, penalty_weight=WEIGHT))
        optimizer = torch.optim.SGD(tnet.parameters(), lr=lr)
        for step in range(steps):
            total_t, _ = torch_ref.lazy_penalized_loss(
                tnet, torch.tensor(x), torch.tensor(y), WEIGHT, step=step, every=every,
                capture_modules=models_torch.MLP_CAPTURE_MODULES)
            optimizer.zero_grad()
            total_t.backward()
            optimizer.step()
            (total_j, _), grads = lazy_step(params, step)
            # The SGD update in NumPy, the same float64 operations: eager JAX compiled a multiply
            # and a subtract per parameter shape.
            params = jax.tree.map(lambda p, g: p - lr * np.asarray(g), params, grads)
            normwise(total_j, total_t.item(), RTOL_EXACT, f"step {step} total")
        expected = torch_ref.export_flax_params(tnet, example_input=example)
        for layer, tensors in expected.items():
            for pname, value in tensors.items():
                normwise(params[layer][pname], value, RTOL_EXACT, f"final {layer}.{pname}")
