"""Every cross-framework comparison of the parity suite, as functions returning ``Comparison`` lists.

Cross-framework code (JAX and PyTorch). The tests assert on these lists and
``python -m parity_tests.report`` tabulates them, so each idea is written once.
Each idea lives in its own module; this one names them all in one place (and keeps
``from parity_tests.comparisons import ...`` working):

* :func:`compare_case` (``parity_tests.quantities``) - one (batch, dtype, layers,
  weight, init) case: logits, loss, total, penalty, each layer's penalty term,
  each activation gradient and every parameter gradient of the total, on
  identical weights.
* :func:`trajectory_comparisons` (``parity_tests.trajectory``) - 50 SGD steps
  over the same batch sequence, parameters compared after every step.
* :func:`maxpool_tie_comparisons` (``parity_tests.ties``) - inputs whose pooling
  windows hold equal maxima.
* :func:`seed_answer_comparisons` (``parity_tests.seed_answer``) - the seed
  answer's literal loop body against ``jax_impl.penalized_loss`` + ``jax.grad``.
* :func:`question_vs_answer_comparisons` (``parity_tests.seed_answer``) - PyTorch
  only: what the question's procedure computes, against the answer's.
"""

from __future__ import annotations

from parity_tests.quantities import (
    EXACT_CONV_OPTIONS,
    Case,
    Layers,
    compare_case,
    compare_quantities,
    default_cases,
    jax_quantities,
    torch_quantities,
)
from parity_tests.seed_answer import (
    SEED_ANSWER_BATCHES,
    question_vs_answer,
    question_vs_answer_comparisons,
    seed_answer_comparisons,
)
from parity_tests.ties import TIE_KINDS, count_tied_windows, maxpool_tie_comparisons, tie_setup
from parity_tests.trajectory import (
    DISPLACEMENT_TOLERANCES,
    KINK_MARGIN,
    TRAJECTORY_BATCH,
    TRAJECTORY_LR,
    TRAJECTORY_STEPS,
    Trajectory,
    kink_margin,
    trajectory_comparisons,
)

__all__ = [
    "DISPLACEMENT_TOLERANCES",
    "EXACT_CONV_OPTIONS",
    "KINK_MARGIN",
    "SEED_ANSWER_BATCHES",
    "TIE_KINDS",
    "TRAJECTORY_BATCH",
    "TRAJECTORY_LR",
    "TRAJECTORY_STEPS",
    "Case",
    "Layers",
    "Trajectory",
    "compare_case",
    "compare_quantities",
    "count_tied_windows",
    "default_cases",
    "jax_quantities",
    "kink_margin",
    "maxpool_tie_comparisons",
    "question_vs_answer",
    "question_vs_answer_comparisons",
    "seed_answer_comparisons",
    "tie_setup",
    "torch_quantities",
    "trajectory_comparisons",
]
