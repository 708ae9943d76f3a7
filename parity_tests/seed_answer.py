"""The seed answer's own PyTorch code against JAX, and the question's procedure against the answer's.

``seed_answer_comparisons`` runs the answer's literal loop body (``parity_tests.seed_code``)
against ``jax_impl.penalized_loss`` + ``jax.grad`` (cross-framework);
``question_vs_answer_comparisons`` is PyTorch only: what the question's procedure computes,
against the answer's.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from flax import traverse_util

import torch_ref
from parity_tests import seed_code
from parity_tests.harness import (
    Comparison,
    compare,
    compare_trees,
    identical_weights,
    jax_dtype,
    make_batch,
    to_numpy,
    torch_inputs,
    torch_net,
)
from parity_tests.quantities import jax_quantities

# ----------------------------------------------------------------------- the seed answer's code

#: (batch, init batch) pairs of the independent check; init batch != batch except the seed's 1.
SEED_ANSWER_BATCHES = ((1, 32), (7, 1), (32, 7))


def seed_answer_comparisons(batch: int, init_batch: int, penalty_weight: float = 10.0,
                            seed: int = 0) -> list[Comparison]:
    """The answer's literal loop body (``parity_tests.seed_code``) against JAX, float64.

    The weights come from ``jax_impl.Net().init`` at ``init_batch`` images and
    reach the answer's own ``Net`` through ``load_flax_params`` (into a
    ``torch_ref.Net``) and ``load_state_dict`` (same parameter names).
    """
    dtype = "float64"
    x, y = make_batch(seed + 11, batch, dtype)
    with jax_dtype(dtype):
        ref, params = identical_weights(seed, dtype, init_batch)
        actual = jax_quantities(params, x, y, penalty_weight)
    model = seed_code.Net().double()
    model.load_state_dict(ref.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    total = seed_code.loop_body(model, optimizer, *torch_inputs(x, y), penalty_weight)
    case = f"seed answer B={batch} init B={init_batch}"
    out = [compare("total", dtype, actual["total"], to_numpy(total), case=case)]
    grads = torch_ref.export_flax_params(model, grads=True)  # the answer's Net as written
    out += compare_trees("param_grad", dtype, _param_grads(actual), grads, case=case)
    return out


def _param_grads(quantities: dict[str, np.ndarray]) -> dict:
    flat = {k[len("param_grad["):-1]: v for k, v in quantities.items() if k.startswith("param_grad[")}
    return traverse_util.unflatten_dict(flat, sep=".")


# ---------------------------------------------------------------- the question vs the answer


def question_vs_answer(seed: int = 0, batch: int = 3, dtype: str = "float64") -> dict:
    """Run the question's procedure and the answer's (w=1) from identical weights; return both.

    Returns ``question_grads`` / ``answer_grads`` (parameter ``.grad`` in the
    Flax layout), ``question_activation_grads`` (the retained ``.grad`` of
    ``relu1``/``relu2`` after the question's step, NCHW), and, recomputed with
    autograd at the pre-step weights, ``loss_grads`` (d loss / d a) and
    ``penalty_grads`` (d grad_norm / d a, grad_norm = sum_l ||d loss / d a_l||^2).
    """
    x, y = torch_inputs(*make_batch(seed + 21, batch, dtype))
    question = torch_net(seed, dtype)
    answer = copy.deepcopy(question)
    before = copy.deepcopy(question)

    torch_ref.question_step(question, torch.optim.SGD(question.parameters(), lr=0.001), x, y)
    torch_ref.train_step(answer, torch.optim.SGD(answer.parameters(), lr=0.001), x, y, 1.0)

    loss = torch.nn.CrossEntropyLoss()(before(x), y)
    acts = [before.relu1, before.relu2]
    loss_grads = torch.autograd.grad(loss, acts, create_graph=True)
    grad_norm = sum(g.pow(2).sum() for g in loss_grads)
    penalty_grads = torch.autograd.grad(grad_norm, acts)
    names = torch_ref.CAPTURE_NAMES
    return {
        "question_grads": torch_ref.export_flax_params(question, grads=True),
        "answer_grads": torch_ref.export_flax_params(answer, grads=True),
        "question_params": torch_ref.export_flax_params(question),
        "answer_params": torch_ref.export_flax_params(answer),
        "question_activation_grads": {n: to_numpy(getattr(question, n).grad) for n in names},
        "loss_grads": dict(zip(names, map(to_numpy, loss_grads), strict=True)),
        "penalty_grads": dict(zip(names, map(to_numpy, penalty_grads), strict=True)),
    }


def question_vs_answer_comparisons(seed: int = 0, batch: int = 3) -> list[Comparison]:
    """The equalities that hold between the question's and the answer's procedures (float64).

    * weight ``.grad`` of the question == the answer's with ``penalty_weight=1``
      (the question adds grad(loss) and grad(grad_norm) in two backward calls),
      and so are the weights after the SGD step;
    * the question's retained activation ``.grad`` == 2 d loss / d a + d grad_norm / d a:
      ``loss.backward`` writes d loss / d a, ``autograd.grad(loss, ...)`` fires
      the ``retain_grad`` hooks and adds it *again* (PyTorch 2.13), and
      ``grad_norm.backward()`` adds d grad_norm / d a. It is not d loss / d a.
    """
    r = question_vs_answer(seed, batch)
    case = f"question vs answer B={batch}"
    out = compare_trees("question .grad vs answer w=1", "float64", r["question_grads"],
                        r["answer_grads"], case=case)
    out += compare_trees("question params after step vs answer w=1", "float64", r["question_params"],
                         r["answer_params"], case=case)
    expected = {n: 2 * r["loss_grads"][n] + r["penalty_grads"][n] for n in r["loss_grads"]}
    out += compare_trees("question activation .grad vs 2 dL/da + dP/da", "float64",
                         r["question_activation_grads"], expected, case=case)
    return out
