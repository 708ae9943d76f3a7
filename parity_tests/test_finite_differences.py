"""Each side's derivatives, up to the second order of the penalised loss, match finite differences.

JAX: what ``jax.test_util.check_grads(order=2, modes=("rev",))`` checks, on the
total of ``penalized_loss`` (itself a first derivative), i.e. the training
gradient and its own derivative (``check_vjp_compiled`` says how it is run).
The training gradient is checked in the default suite; its own derivative,
a third-order graph through the net whose compilation and trace are most of
this file's time, runs with ``-m slow``: its custom pieces (the canonical
convolution to third order, the max-pool to second) are held to XLA's own
derivatives by ``tests/test_layers.py`` in the default suite.
PyTorch: ``torch.autograd.gradcheck`` and
``gradgradcheck`` on ``torch_ref.penalized_loss``. Both in float64 on one
image; both probe random directions, so every parameter takes part.

ReLU and max-pool are piecewise linear: a finite-difference step that moves a
pre-activation across zero, or reorders a pooling window, differentiates a
different piece. ``FD_SEED`` was picked (the best of seeds 0-39) so that every
pool output is at least ``KINK_MARGIN`` from zero and every window's top two
entries are that far apart; with ``EPS`` = 1e-7 a step moves pre-activations
by ~1e-6 (eps x |N(0,1) direction . patch|), 50x less.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from jax.test_util import check_vjp

import torch_ref
from jax_impl import Net, penalized_loss
from parity_tests.harness import fast_jit, jax_inputs, make_batch, torch_inputs, torch_net

FD_SEED = 26
KINK_MARGIN = 5e-5
# float64 central differences: truncation ~EPS^2 = 1e-14, rounding ~1e-16/EPS = 1e-9 of the value.
EPS = 1e-7
# ~100x above the rounding error of a central difference at EPS = 1e-7 in float64.
FD_RTOL = FD_ATOL = 1e-7


@pytest.fixture(scope="module")
def net_and_batch():
    return torch_net(0, "float64"), make_batch(FD_SEED, 1, "float64")


def kink_distance(net: torch.nn.Module, x: np.ndarray) -> float:
    """Smallest distance of a pool output to 0, or of a window's maximum to its runner-up."""
    with torch.no_grad():
        conv1 = net.conv1(torch.from_numpy(x))
        conv2 = net.conv2(net.relu(net.pool(conv1)))
    distances = []
    for pre_pool in (conv1, conv2):
        b, c, h, w = pre_pool.shape
        windows = pre_pool.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(-1, 4)
        top2 = windows.sort(dim=-1).values[:, -2:]
        distances += [float((top2[:, 1] - top2[:, 0]).min()), float(top2[:, 1].abs().min())]
    return min(distances)


def test_the_batch_is_far_from_every_relu_and_maxpool_kink(net_and_batch):
    net, (x, _) = net_and_batch
    assert kink_distance(net, x) > KINK_MARGIN


def check_vjp_compiled(fun, vjp_fun, params) -> None:
    """``jax.test_util.check_vjp`` of ``fun`` at ``params``, with ``vjp_fun(p, ct)`` its VJP.

    ``check_vjp`` compares the VJP against a central finite difference along a
    random direction (``np.random.RandomState(0)``, as ``check_grads`` draws).
    ``fun`` and ``vjp_fun`` are compiled by the caller (``harness.fast_jit``:
    the check compares JAX with JAX, so XLA's optimisation effort, rounding
    only, does not matter to it, and the third-order graph compiles 2x faster).
    Parameters and results cross as NumPy, so the check's own arithmetic
    (``p +- eps * t``, inner products) runs in NumPy instead of as one small
    JAX compilation per parameter shape, the same float64 operations.
    """

    def as_numpy(tree):
        return jax.tree.map(np.asarray, tree)

    def f(p):
        return as_numpy(fun(p))

    check_vjp(f, lambda p: (f(p), lambda ct: as_numpy(vjp_fun(p, ct))), (as_numpy(params),), eps=EPS,
              atol=FD_ATOL, rtol=FD_RTOL)


@pytest.fixture(scope="module")
def jax_total(net_and_batch):
    """``(params, total, total compiled, its VJP compiled)``: the penalised total (w = 10) of the batch."""
    net, (x, y) = net_and_batch
    params = torch_ref.export_flax_params(net)  # NumPy, as check_vjp_compiled passes parameters
    with jax.enable_x64(True):
        xj, yj = jax_inputs(x, y)

    def total(p):
        return penalized_loss(p, Net(), xj, yj, penalty_weight=10.0)[0]

    return params, total, fast_jit(total), fast_jit(lambda p, ct: jax.vjp(total, p)[1](ct))


def test_jax_training_gradient_matches_finite_differences(jax_total, x64):
    """The first of ``check_grads(total, order=2, modes=("rev",))``'s two checks: the VJP of ``total``."""
    params, _, total_compiled, total_vjp = jax_total
    check_vjp_compiled(total_compiled, total_vjp, params)


@pytest.mark.slow
def test_jax_derivative_of_the_training_gradient_matches_finite_differences(jax_total, x64):
    """The second of ``check_grads(total, order=2, modes=("rev",))``'s checks (see the module docstring).

    The VJP of ``g(p) = vjp(total, p)(total(p))``, the gradient's own
    derivative. Written out (not ``check_grads``) so that each function is
    compiled once with ``fast_jit`` (``compiler_options`` may only be given to
    the outermost jit, and ``check_grads`` takes VJPs of the function it is
    given); ``g`` itself is evaluated with the two compiled functions of the
    first check.
    """
    params, total, total_compiled, total_vjp = jax_total

    def g(p):
        value, pullback = jax.vjp(total, p)
        return pullback(value)[0]

    check_vjp_compiled(lambda p: total_vjp(p, total_compiled(p))[0],
                       fast_jit(lambda p, ct: jax.vjp(g, p)[1](ct)), params)


class BoundNet:
    """``net`` with its parameters replaced by ``params`` (``torch.func.functional_call``).

    ``torch_ref.penalized_loss`` only calls ``model(x)`` and ``model.captures()``,
    so this makes the penalised loss a function of the parameters for gradcheck.
    """

    def __init__(self, net: torch.nn.Module, params: dict[str, torch.Tensor]):
        self.net, self.params = net, params

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.net, self.params, (x,))

    def captures(self) -> dict[str, torch.Tensor]:
        return self.net.captures()


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck],
                         ids=["gradcheck", "gradgradcheck"])
def test_torch_reference_derivatives_match_finite_differences(net_and_batch, check):
    net, batch = net_and_batch
    x, y = torch_inputs(*batch)
    names = [name for name, _ in net.named_parameters()]

    def total(*flat):
        return torch_ref.penalized_loss(BoundNet(net, dict(zip(names, flat, strict=True))), x, y, 10.0)[0]

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())
    # fast_mode: random projections, so the cost does not grow with the 69,706 parameters.
    assert check(total, inputs, eps=EPS, atol=FD_ATOL, rtol=FD_RTOL, fast_mode=True)

