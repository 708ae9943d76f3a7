"""Each side's derivatives, up to the second order of the penalised loss, match finite differences.

JAX: ``jax.test_util.check_grads(order=2, modes=("rev",))`` on the total of
``penalized_loss`` (itself a first derivative), i.e. the training gradient and
its own derivative. PyTorch: ``torch.autograd.gradcheck`` and
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
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

import torch_ref
from jax_impl import Net, penalized_loss
from parity_tests.harness import jax_inputs, make_batch, torch_inputs, torch_net

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


def test_jax_penalized_loss_derivatives_to_second_order_match_finite_differences(net_and_batch, x64):
    net, (x, y) = net_and_batch
    params = jax.tree.map(jnp.asarray, torch_ref.export_flax_params(net))
    xj, yj = jax_inputs(x, y)

    def total(p):
        return penalized_loss(p, Net(), xj, yj, penalty_weight=10.0)[0]

    check_grads(jax.jit(total), (params,), order=2, modes=("rev",), eps=EPS, atol=FD_ATOL, rtol=FD_RTOL)


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

