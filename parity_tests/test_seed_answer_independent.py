"""An independent check: the seed answer's own loop body agrees with ``jax_impl.penalized_loss``.

``parity_tests/seed_code.py`` holds the answer's ``Net`` and loop body as
posted (not ``torch_ref``). Its penalised loss and the parameters' ``.grad``
after its ``loss.backward()`` must equal ``penalized_loss`` and ``jax.grad``
of it to 1e-10 (float64), for several batch sizes and init batch sizes.

The default suite checks the seed's batch 1 and batch 7 (the JAX side shares
its compilations with the parity grid and the max-pool tie checks); batch 32
runs with ``-m slow``, as the grid's batch-32 cells do: one more compilation
(and an init at batch 7) for the same formulas as batch 7.
"""

from __future__ import annotations

import pytest
import torch

from parity_tests import seed_code
from parity_tests.comparisons import SEED_ANSWER_BATCHES, seed_answer_comparisons
from parity_tests.harness import TOLERANCES, assert_all_pass


@pytest.mark.parametrize(("batch", "init_batch"), [
    pytest.param(b, i, id=f"B={b} init B={i}", marks=[pytest.mark.slow] if b == 32 else [])
    for b, i in SEED_ANSWER_BATCHES
])
def test_seed_answer_loop_body_matches_jax_penalized_loss(batch, init_batch):
    comparisons = seed_answer_comparisons(batch, init_batch)
    assert len(comparisons) == 7  # the total and six parameter gradients
    assert all(c.tolerance == TOLERANCES["float64"] for c in comparisons)
    assert_all_pass(comparisons)


def test_seed_answer_model_has_the_reference_parameter_names():
    names = {n: tuple(p.shape) for n, p in seed_code.Net().named_parameters()}
    assert names == {"conv1.weight": (32, 3, 5, 5), "conv1.bias": (32,), "conv2.weight": (64, 32, 5, 5),
                     "conv2.bias": (64,), "linear.weight": (10, 1600), "linear.bias": (10,)}
    assert seed_code.Net()(torch.rand(2, 3, 32, 32)).shape == (2, 10)
