"""Max-pool windows with equal maxima: both frameworks send the gradient to the first maximum.

PyTorch's ``MaxPool2d`` routes a window's gradient to the first maximum in
row-major order; ``jax_impl.max_pool_2x2`` must do the same (``jnp.max`` over
a window would split it between the tied entries). The inputs are built so
that ties are exact in both frameworks (``comparisons.tie_setup``).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jax_impl.model
import torch_ref
from jax_impl import Net, penalized_loss
from parity_tests.comparisons import TIE_KINDS, count_tied_windows, maxpool_tie_comparisons, tie_setup
from parity_tests.harness import assert_all_pass, compare_trees, failures, fast_jit, jax_inputs, torch_inputs


@pytest.mark.parametrize("kind", TIE_KINDS)
def test_inputs_really_contain_tied_windows_in_both_pools(kind):
    net, x, _ = tie_setup(kind, "float64")
    counts = count_tied_windows(net, x)
    assert counts["pool1"] > 100 and counts["pool2"] > 10, counts


@pytest.mark.parametrize("kind", TIE_KINDS)
def test_gradients_agree_when_pooling_windows_tie(kind, dtype):
    assert_all_pass(maxpool_tie_comparisons(kind, dtype))


def split_ties_max_pool(x):
    """2x2 max pool by ``max`` over the window: its gradient is shared between tied maxima."""
    b, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def test_a_pool_that_splits_ties_is_caught(monkeypatch, x64):
    """The tie check has teeth: the same comparison fails for a tie-splitting max pool."""
    # Two images: every pool window of the "constant" kind ties, so two are as telling as the default 7
    # (and cost a third of the time).
    net, x, y = tie_setup("constant", "float64", batch=2)
    net.zero_grad()
    total, _ = torch_ref.penalized_loss(net, *torch_inputs(x, y), 10.0)
    total.backward()
    expected = torch_ref.export_flax_params(net, grads=True)
    params = torch_ref.export_flax_params(net)  # NumPy: the compiled program converts it
    monkeypatch.setattr(jax_impl.model, "max_pool_2x2", split_ties_max_pool)
    xj, yj = jax_inputs(x, y)
    # A fresh jit traces the patched pool (the suite's cached jits hold the real one). fast_jit: this
    # deliberately wrong pool is not the shipped code, and it misses by far more than XLA's effort moves.
    grads = fast_jit(jax.grad(lambda p: penalized_loss(p, Net(), xj, yj, penalty_weight=10.0)[0]))(params)
    bad = failures(compare_trees("param_grad", "float64", jax.tree.map(np.asarray, grads), expected))
    assert "param_grad[conv1.kernel]" in {c.quantity for c in bad}
