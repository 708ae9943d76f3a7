"""What the seed *question*'s procedure computes, against the *answer*'s (PyTorch only, float64).

The question's loop body (``torch_ref.question_step``)::

    output = model(input); relu1.retain_grad(); relu2.retain_grad()
    loss = CE(output, label); optimizer.zero_grad()
    loss.backward(retain_graph=True)                                  # (1)
    grads = torch.autograd.grad(loss, [relu1, relu2], create_graph=True)  # (2)
    grad_norm = sum(g.pow(2).sum() for g in grads)
    grad_norm.backward()                                              # (3)
    optimizer.step()

Equal: the weights' ``.grad`` is grad(loss) from (1) plus grad(grad_norm) from
(3), which is exactly the answer's gradient with ``penalty_weight=1``; so is
the step. Not equal: the retained activations' ``.grad`` ends as
``2 dL/da + d grad_norm/da``: (1) writes dL/da, (2) fires the ``retain_grad``
hooks and adds dL/da again (PyTorch 2.13; the *leaves'* ``.grad`` is left
alone by ``autograd.grad``), and (3) adds d grad_norm / da. That is why the
asker saw activation gradients change in ``grad_norm.backward()``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import torch_ref
from parity_tests import seed_code
from parity_tests.comparisons import question_vs_answer, question_vs_answer_comparisons
from parity_tests.harness import assert_all_pass, compare, make_batch, to_numpy, torch_inputs, torch_net

DTYPE = "float64"


@pytest.fixture(scope="module")
def comparisons():
    return question_vs_answer_comparisons()


def test_question_weight_grads_and_step_equal_the_answer_with_penalty_weight_one(comparisons):
    equal = [c for c in comparisons if "answer w=1" in c.quantity]
    assert len(equal) == 12  # six .grad tensors, six parameters after the step
    assert_all_pass(equal)


def test_question_activation_grad_is_twice_dloss_plus_dpenalty(comparisons):
    assert_all_pass([c for c in comparisons if "activation .grad" in c.quantity])


def test_question_activation_grad_is_not_dloss_nor_dloss_plus_dpenalty():
    r = question_vs_answer()
    for name in torch_ref.CAPTURE_NAMES:
        got, loss_grad, penalty_grad = (r[k][name] for k in
                                        ("question_activation_grads", "loss_grads", "penalty_grads"))
        for wrong in (loss_grad, loss_grad + penalty_grad):
            # max rel ~1 measured: the retained .grad is about twice d loss / d a.
            assert compare(name, DTYPE, got, wrong).max_rel > 0.5


def fresh(seed=0, batch=3):
    model = torch_net(seed, DTYPE)
    x, y = torch_inputs(*make_batch(seed + 21, batch, DTYPE))
    output = model(x)
    model.relu1.retain_grad()
    model.relu2.retain_grad()
    return model, nn.CrossEntropyLoss()(output, y)


def param_grads(model) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_each_call_of_the_question_adds_to_the_activation_grad():
    model, loss = fresh()
    acts = [model.relu1, model.relu2]
    loss_grads = [g.detach().clone() for g in torch.autograd.grad(loss, acts, retain_graph=True)]
    for a in acts:
        a.grad = None  # the probe above fired the retain_grad hooks too; start from nothing

    loss.backward(retain_graph=True)  # (1)
    for a, g in zip(acts, loss_grads, strict=True):
        assert torch.equal(a.grad, g)
    weights_after_1 = param_grads(model)

    grads = torch.autograd.grad(loss, acts, create_graph=True)  # (2)
    for a, g in zip(acts, loss_grads, strict=True):
        np.testing.assert_allclose(to_numpy(a.grad), 2 * to_numpy(g), rtol=1e-15)  # float64: 2g is exact
    for before, p in zip(weights_after_1, model.parameters(), strict=True):
        assert torch.equal(p.grad, before)  # leaves untouched by autograd.grad

    grad_norm = sum(g.pow(2).sum() for g in grads)
    after_2 = [a.grad.detach().clone() for a in acts]
    penalty_grads = torch.autograd.grad(grad_norm, acts, retain_graph=True)  # fires the hooks as well
    for a, value in zip(acts, after_2, strict=True):
        a.grad = value  # undo the probe
    grad_norm.backward()  # (3)
    for a, g, pg in zip(acts, loss_grads, penalty_grads, strict=True):
        # float64 rounding of one sum; 1e-12 is ~1e4 ulps.
        np.testing.assert_allclose(to_numpy(a.grad), to_numpy(2 * g + pg), rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("prefill", [False, True], ids=["grad None", "grad prefilled"])
@pytest.mark.parametrize("only_inputs", [None, True, False], ids=["default", "only_inputs=True", "False"])
def test_autograd_grad_never_accumulates_into_parameter_grad(prefill, only_inputs):
    """The answer says autograd.grad accumulates into the leaves' .grad unless only_inputs=True: not so."""
    model, loss = fresh()
    if prefill:
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
    before = param_grads(model)
    kwargs = {} if only_inputs is None else {"only_inputs": only_inputs}
    if only_inputs is False:
        with pytest.warns(FutureWarning, match="only_inputs argument is deprecated and is ignored"):
            torch.autograd.grad(loss, [model.relu1, model.relu2], create_graph=True, **kwargs)
    else:
        torch.autograd.grad(loss, [model.relu1, model.relu2], create_graph=True, **kwargs)
    for b, p in zip(before, model.parameters(), strict=True):
        assert (p.grad is None and b is None) or torch.equal(p.grad, b)


def test_activation_grads_do_not_accumulate_across_steps():
    """Each forward makes new activation tensors, so nothing carries over (the answer suspected it did)."""
    model = torch_net(0, DTYPE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    batches = [torch_inputs(*make_batch(s, 3, DTYPE)) for s in (31, 32)]
    torch_ref.question_step(model, optimizer, *batches[0])
    before_second = torch_net(0, DTYPE)
    before_second.load_state_dict(model.state_dict())  # (deepcopy refuses the stored activations)
    torch_ref.question_step(model, optimizer, *batches[1])

    x, y = batches[1]
    loss = nn.CrossEntropyLoss()(before_second(x), y)
    acts = [before_second.relu1, before_second.relu2]
    loss_grads = torch.autograd.grad(loss, acts, create_graph=True)
    penalty_grads = torch.autograd.grad(sum(g.pow(2).sum() for g in loss_grads), acts)
    for name, g, pg in zip(torch_ref.CAPTURE_NAMES, loss_grads, penalty_grads, strict=True):
        assert_all_pass([compare(name, DTYPE, to_numpy(getattr(model, name).grad), to_numpy(2 * g + pg))])


def test_the_questions_model_as_posted_does_not_run():
    with pytest.raises(NameError, match="relu1"):
        seed_code.QuestionNet()(torch.rand(1, 3, 32, 32))
