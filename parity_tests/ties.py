"""The max-pool tie cases: weights and inputs whose pooling windows hold equal maxima.

Cross-framework code (JAX and PyTorch). Which tied entry receives the gradient is a convention
each framework fixes; these cases check that both fix the same one (docs/parity.md, "Max-pool
ties"), with every quantity of ``parity_tests.quantities``.
"""

from __future__ import annotations

import jax
import numpy as np
import torch

import torch_ref
from parity_tests.harness import TORCH_DTYPES, Comparison, jax_dtype, torch_net
from parity_tests.quantities import compare_quantities, jax_quantities, torch_quantities

TIE_KINDS = ("constant", "quantised")


def tie_setup(kind: str, dtype: str, batch: int = 7, seed: int = 0):
    """Weights and inputs whose max-pool windows contain equal maxima.

    ``"constant"``: conv1's kernel is zero and its bias positive, so every
    pool1 window is four equal numbers; conv2 (weights rounded to 1/64) of
    that constant image is constant per channel, so every pool2 window ties
    too.

    ``"quantised"``: weights rounded to multiples of 1/16 (conv1) and 1/64
    (conv2) and pixels in {0, 1/4, 2/4, 3/4}: every conv output is a short
    dyadic fraction computed *exactly* in either framework (whatever the
    summation order), so ties are frequent, scattered, and identical on both
    sides. On a GPU this holds for direct convolution algorithms only, hence
    :data:`EXACT_CONV_OPTIONS` on the JAX side (PyTorch runs on the CPU).

    Returns ``(torch_net, x_nchw, y)``; export the weights with ``export_flax_params``.
    """
    net = torch_net(seed, dtype)
    rng = np.random.default_rng(seed + 7)
    with torch.no_grad():
        if kind == "constant":
            net.conv1.weight.zero_()
            net.conv1.bias.copy_(torch.arange(1, 33, dtype=TORCH_DTYPES[dtype]) / 64)
            # Dyadic relu1 and conv2 weights make conv2's sums exact, hence exact ties on both sides
            # (with float weights, PyTorch's float64 conv returns values 1e-16 apart, and the tie is gone).
            net.conv2.weight.copy_(torch.round(net.conv2.weight * 64) / 64)
            x = rng.random((batch, 3, 32, 32)).astype(dtype)
        elif kind == "quantised":
            for layer, step in ((net.conv1, 16), (net.conv2, 64)):
                layer.weight.copy_(torch.round(layer.weight * step) / step)
                layer.bias.copy_(torch.round(layer.bias * step) / step)
            x = (rng.integers(0, 4, (batch, 3, 32, 32)) / 4).astype(dtype)
        else:
            raise ValueError(f"tie kind must be one of {TIE_KINDS}, got {kind!r}")
    y = rng.integers(0, 10, batch).astype(np.int64)
    return net, x, y


def count_tied_windows(net: torch.nn.Module, x_nchw: np.ndarray) -> dict[str, int]:
    """Number of 2x2 pooling windows whose maximum occurs more than once, for pool1 and pool2."""

    def tied(pre_pool: torch.Tensor) -> int:
        b, c, h, w = pre_pool.shape
        windows = pre_pool[:, :, : h // 2 * 2, : w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2)
        windows = windows.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // 2, w // 2, 4)
        top = windows.max(dim=-1, keepdim=True).values
        return int(((windows == top).sum(dim=-1) > 1).sum())

    with torch.no_grad():
        conv1 = net.conv1(torch.from_numpy(x_nchw))
        conv2 = net.conv2(net.relu(net.pool(conv1)))
    return {"pool1": tied(conv1), "pool2": tied(conv2)}


def maxpool_tie_comparisons(kind: str, dtype: str, penalty_weight: float = 10.0) -> list[Comparison]:
    """All quantities of :func:`compare_case`, on the tie-laden weights and inputs of ``kind``."""
    net, x, y = tie_setup(kind, dtype)
    with jax_dtype(dtype):
        params = jax.device_put(torch_ref.export_flax_params(net))  # harness.jax_inputs: no compilation
        actual = jax_quantities(params, x, y, penalty_weight, exact_convolutions=True)
    expected = torch_quantities(net, x, y, penalty_weight)
    return compare_quantities(dtype, actual, expected, f"max-pool ties ({kind})")
