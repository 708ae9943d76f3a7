"""JAX and PyTorch compute the same logits, losses, activation gradients and weight gradients.

On identical weights and inputs, in float64 and float32, for batch sizes 1,
7 and 32, init batch sizes different from the apply batch, penalty weights 0
and 10, and each capture point alone or both (``comparisons.default_cases``).
Tolerances: ``harness.TOLERANCES`` (float64 1e-10, float32 1e-5, normwise).
"""

from __future__ import annotations

import pytest

from parity_tests.comparisons import Case, compare_case, default_cases
from parity_tests.harness import assert_all_pass

PARAM_GRADS = {f"param_grad[{layer}.{name}]" for layer in ("conv1", "conv2", "linear")
               for name in ("kernel", "bias")}


def expected_quantities(case: Case) -> set[str]:
    layers = case.layers or ("relu1", "relu2")
    return ({"logits", "loss", "penalty", "total"} | PARAM_GRADS
            | {f"penalty_term[{n}]" for n in layers} | {f"activation_grad[{n}]" for n in layers})


def test_grid_covers_every_axis_of_the_issue():
    cases = default_cases()
    for dtype in ("float64", "float32"):
        mine = [c for c in cases if c.dtype == dtype]
        assert {c.batch for c in mine} == {1, 7, 32}
        assert {c.penalty_weight for c in mine} == {0.0, 10.0}
        assert {c.layers for c in mine} == {None, ("relu1",), ("relu2",)}
        assert any(c.init_batch is not None and c.init_batch != c.batch for c in mine)


@pytest.mark.parametrize("case", default_cases(), ids=lambda c: c.name)
def test_every_quantity_agrees_on_identical_weights(case):
    comparisons = compare_case(case)
    assert {c.quantity for c in comparisons} == expected_quantities(case)
    assert_all_pass(comparisons)
