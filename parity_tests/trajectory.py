"""The trajectory check: both frameworks trained ``TRAJECTORY_STEPS`` SGD steps, compared after each.

Cross-framework code (JAX and PyTorch). Float32 steps that disagree only because a
pre-activation sat at a ReLU or max-pool kink (``kink_margin``) are excused and reported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import numpy as np
import torch

import torch_ref
from jax_impl import Net, jit_options, penalized_loss
from parity_tests.harness import (
    TOLERANCES,
    Comparison,
    Tolerance,
    compare_trees,
    failures,
    identical_weights,
    jax_dtype,
    jax_inputs,
    make_batch,
    torch_inputs,
)

#: SGD learning rate of the trajectory check. The seed's 0.001 moves the weights by 0.9% of their
#: largest entry in 50 steps; 0.01 moves them 6.3% (``Trajectory.relative_move``), so a gradient that
#: is wrong by 1% shifts the parameters by ~6e-4 of their scale, 60x the float32 tolerance, instead of
#: hiding in it. Float32 trajectories only agree while no pre-activation lands within float32
#: rounding (~3e-7) of a ReLU or max-pool kink: with the jax_impl of commit a5eafda and lr 0.05,
#: step 2 put a pool1 output 7.6e-10 from zero, the frameworks took different branches (4.7e-5 at
#: step 2, 0.17 by step 46) while float64 agreed to 1e-15; see docs/parity.md.
TRAJECTORY_LR = 0.01
TRAJECTORY_STEPS = 50

#: Tolerance on the displacement theta_t - theta_0 (the parameters themselves use TOLERANCES).
DISPLACEMENT_TOLERANCES = {
    "float64": TOLERANCES["float64"],
    # Each step stores theta_t in float32 (half an ulp of |theta| <= 0.2 is 7e-9) while the displacement
    # after one step is only lr * |g| ~ 1e-3 of that; rounding alone gives ~1e-5 of the displacement
    # (measured max 2.5e-5, at step 1), so 1e-4 is the float32 bound, with 4x headroom.
    "float32": Tolerance(1e-4, 0.0, "float32 rounding of theta (7e-9) vs a displacement of ~lr*|g|; 4x"),
}
TRAJECTORY_BATCH = 8


@functools.cache
def _jax_sgd_step(lr: float, penalty_weight: float):
    model = Net()

    def step(params, x, y):
        grads = jax.grad(lambda p: penalized_loss(p, model, x, y, penalty_weight=penalty_weight)[0])(params)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads)

    return jax.jit(step, **jit_options())  # the CLI's kernels (jax_impl.xla_options)


#: How close (relative to the layer's largest |value|) a pre-activation must come to a kink for
#: float32 to be allowed to take another branch there: the two frameworks' float32 convolutions sum
#: 75 (conv1) and 800 (conv2) products in different orders, so their outputs differ by up to ~1e-6 of
#: the layer's scale; a max-pool window whose two largest entries are closer than that, or a ReLU
#: input closer to 0, can send the gradient to another entry. Float64 differs by ~1e-15: no excuse.
KINK_MARGIN = {"float64": 0.0, "float32": 1e-6}


def kink_margin(net: torch.nn.Module, x_nchw: np.ndarray) -> float:
    """Distance of ``torch_ref.Net``'s pre-activations on ``x`` to the nearest kink, computed in float64.

    Kinks: a 2x2 max-pool window's two largest entries (which one gets the
    gradient) and a pool output at 0 (the ReLU after it). Each distance is
    relative to its layer's largest |value|; the minimum over both stages.
    """
    margins = []
    with torch.no_grad():
        h = torch.from_numpy(np.asarray(x_nchw, dtype=np.float64))
        for conv in (net.conv1, net.conv2):
            c = torch.nn.functional.conv2d(h, conv.weight.double(), conv.bias.double())  # (B, C, H, W)
            b, ch, height, width = c.shape
            h2, w2 = height // 2, width // 2
            windows = c[:, :, : 2 * h2, : 2 * w2].reshape(b, ch, h2, 2, w2, 2).permute(0, 1, 2, 4, 3, 5)
            top2 = windows.reshape(b, ch, h2, w2, 4).topk(2).values  # the two largest of each 2x2 window
            pooled = top2[..., 0]
            scale = float(c.abs().max())
            margins += [float((top2[..., 0] - top2[..., 1]).min()) / scale, float(pooled.abs().min()) / scale]
            h = torch.relu(pooled)
    return min(margins)


@dataclass(frozen=True)
class Trajectory:
    """Per-step comparisons of the parameters and how far the parameters moved in total.

    ``kink_steps`` lists ``(step, margin)`` for the float32 steps that disagreed while a
    pre-activation sat within ``KINK_MARGIN`` of a kink (``kink_margin``): there both
    branches are right to float32 rounding, the step's comparisons are left out, and JAX
    continues from PyTorch's parameters so the branch does not propagate.
    """

    params: list[Comparison]
    displacement: list[Comparison]
    relative_move: float
    kink_steps: tuple[tuple[int, float], ...] = ()


def trajectory_comparisons(dtype: str, steps: int = TRAJECTORY_STEPS, batch: int = TRAJECTORY_BATCH,
                           lr: float = TRAJECTORY_LR, penalty_weight: float = 10.0, seed: int = 0
                           ) -> Trajectory:
    """Train both frameworks ``steps`` SGD steps from identical weights on the same batches.

    After every step the parameters are compared (``trajectory params[...]``)
    and so is the displacement from the initial weights, ``theta_t - theta_0``
    (``trajectory displacement[...]``): the parameters are dominated by their
    initial values, while the displacement is exactly what the gradients
    produced, so it is the sharper check. ``relative_move`` is
    ``||theta_T - theta_0||_inf / ||theta_0||_inf`` (PyTorch side), the evidence
    that the parameters moved measurably.
    """
    with jax_dtype(dtype):
        net, params = identical_weights(seed, dtype)
        initial = jax.tree.map(np.asarray, params)
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        jax_step = _jax_sgd_step(lr, penalty_weight)
        param_cmp, move_cmp, kink_steps = [], [], []
        for t in range(1, steps + 1):
            x, y = make_batch(seed * 100_003 + t, batch, dtype)
            margin = kink_margin(net, x)
            params = jax_step(params, *jax_inputs(x, y))
            torch_ref.train_step(net, optimizer, *torch_inputs(x, y), penalty_weight)
            expected = torch_ref.export_flax_params(net)
            actual = jax.tree.map(np.asarray, params)
            case = f"step {t}"
            step_params = compare_trees("trajectory params", dtype, actual, expected, case=case)
            step_moves = compare_trees(
                "trajectory displacement", dtype,
                jax.tree.map(np.subtract, actual, initial), jax.tree.map(np.subtract, expected, initial),
                DISPLACEMENT_TOLERANCES[dtype], case=case)
            if margin < KINK_MARGIN[dtype] and failures(step_params + step_moves):
                kink_steps.append((t, margin))
                params = jax.device_put(expected)  # harness.jax_inputs: no compilation
                continue
            param_cmp += step_params
            move_cmp += step_moves
    final_move = max(float(np.max(np.abs(e - i))) for e, i in zip(
        jax.tree.leaves(expected), jax.tree.leaves(initial), strict=True))
    scale = max(float(np.max(np.abs(i))) for i in jax.tree.leaves(initial))
    return Trajectory(param_cmp, move_cmp, final_move / scale, tuple(kink_steps))
