"""50 SGD steps from identical weights over the same batches stay together, step by step.

Float64: parameters and their displacement from the start within 1e-10
(relative, normwise) after every step. Float32: parameters within 1e-5 after
every step; the displacement within 1e-4 (``DISPLACEMENT_TOLERANCES`` says why).
The learning rate (``TRAJECTORY_LR`` = 0.01, 10x the seed's) is chosen so that
the parameters move measurably; its comment says why not more.
"""

from __future__ import annotations

import pytest

from parity_tests.comparisons import TRAJECTORY_STEPS, trajectory_comparisons
from parity_tests.harness import assert_all_pass

PARAM_TENSORS = 6


@pytest.fixture(scope="module", params=["float64", "float32"])
def trajectory(request):
    return request.param, trajectory_comparisons(request.param)


def test_parameters_agree_after_every_step(trajectory):
    _, result = trajectory
    assert len(result.params) == TRAJECTORY_STEPS * PARAM_TENSORS
    assert {c.case for c in result.params} == {f"step {t}" for t in range(1, TRAJECTORY_STEPS + 1)}
    assert_all_pass(result.params)


def test_displacement_from_the_initial_weights_agrees_after_every_step(trajectory):
    _, result = trajectory
    assert len(result.displacement) == TRAJECTORY_STEPS * PARAM_TENSORS
    assert_all_pass(result.displacement)


def test_parameters_move_far_more_than_the_tolerance(trajectory):
    dtype, result = trajectory
    # ~6% measured; 1e-2 is 1000x the float32 tolerance, so a wrong step cannot hide in it.
    assert result.relative_move > 1e-2, f"{dtype}: parameters moved only {result.relative_move:.1e}"
