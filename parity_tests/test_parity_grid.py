"""JAX and PyTorch compute the same logits, losses, activation gradients and weight gradients.

On identical weights and inputs, in float64 and float32, for batch sizes 1,
7 and 32, init batch sizes different from the apply batch, penalty weights 0
and 10, and each capture point alone or both (``comparisons.default_cases``).
Tolerances: ``harness.TOLERANCES`` (float64 1e-10, float32 1e-5, normwise).

The default suite runs :data:`DEFAULT_SUITE_CASES`, five cells that hold every
value of every axis but batch 32 and the native XLA convolution
(``test_default_suite_still_covers_...`` pins that); the other cells run with
``-m slow`` and in ``python -m parity_tests.report``. Each cell costs one XLA
compilation of the double-backprop graph (a few seconds; the weight is traced,
so weights 0 and 10 share one). A cell at batch 32 checks the same formulas as
one at 7; ``conv_impl="xla"`` gives the same penalised gradient as the default
``"canonical"`` (``tests/test_layers.py``, default suite), which the default
cells hold to PyTorch.
"""

from __future__ import annotations

import pytest

from parity_tests.comparisons import Case, compare_case, default_cases
from parity_tests.harness import assert_all_pass

PARAM_GRADS = {f"param_grad[{layer}.{name}]" for layer in ("conv1", "conv2", "linear")
               for name in ("kernel", "bias")}

#: The grid cells of the default suite. The seed's recipe (batch 1, both capture points, w=10,
#: PyTorch's init) in both dtypes; then Flax's init at another batch, each capture point alone and
#: penalty weight 0, in float64 at batch 7, chosen to share compilations with the rest of the suite:
#: the max-pool tie checks (float64 and float32 at batch 7, all quantities), the seed-answer check
#: (float64, batch 1 with Flax's init at 32, batch 7 with it at 1) and the quick report (batch 1).
DEFAULT_SUITE_CASES = (
    Case("float64", batch=1),
    Case("float32", batch=1),
    Case("float64", batch=7, init_batch=32),
    Case("float64", batch=7, layers=("relu1",)),
    Case("float64", batch=7, penalty_weight=0.0, layers=("relu2",), init_batch=1),
)


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


def test_default_suite_still_covers_every_axis_but_batch_32_and_xla_convolutions():
    """The default subset keeps the seed recipe in both dtypes and every other axis value at least once."""
    cases = default_cases()
    assert set(DEFAULT_SUITE_CASES) <= set(cases)
    for dtype in ("float64", "float32"):
        assert Case(dtype, batch=1) in DEFAULT_SUITE_CASES  # the seed's recipe
    assert {c.dtype for c in DEFAULT_SUITE_CASES} == {c.dtype for c in cases}
    assert {c.batch for c in DEFAULT_SUITE_CASES} == {c.batch for c in cases} - {32}
    assert {c.penalty_weight for c in DEFAULT_SUITE_CASES} == {c.penalty_weight for c in cases}
    assert {c.layers for c in DEFAULT_SUITE_CASES} == {c.layers for c in cases}
    assert {c.conv_impl for c in DEFAULT_SUITE_CASES} == {c.conv_impl for c in cases} - {"xla"}
    assert any(c.init_batch is None for c in DEFAULT_SUITE_CASES)
    assert any(c.init_batch is not None and c.init_batch != c.batch for c in DEFAULT_SUITE_CASES)


@pytest.mark.parametrize("case", [c if c in DEFAULT_SUITE_CASES else pytest.param(c, marks=pytest.mark.slow)
                                  for c in default_cases()], ids=lambda c: c.name)
def test_every_quantity_agrees_on_identical_weights(case):
    comparisons = compare_case(case)
    assert {c.quantity for c in comparisons} == expected_quantities(case)
    assert_all_pass(comparisons)
