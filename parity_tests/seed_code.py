"""The seed's PyTorch code, copied literally: the answer's (an independent oracle) and the question's model.

Deliberately *not* ``torch_ref``: ``Net`` and ``loop_body`` below are the
answer's text (``../shared/seed/activation_gradient_penalty_qa.txt``) with only
these changes, each marked ``# CHANGED``:

* ``super().__init__()`` spelled the modern way (same effect);
* the loop body is wrapped in a function that takes the model, optimizer,
  batch and weight, and returns the penalised loss instead of calling
  ``optimizer.step()`` (the caller steps, so the gradients can be read first);
* ``only_inputs=True`` is kept and its deprecation is noted (PyTorch ignores it).

Used by ``test_seed_answer_independent.py`` and ``python -m parity_tests.report``
to check ``jax_impl.penalized_loss`` against code nobody on this project wrote.

``QuestionNet`` is the question's model, verbatim but for the class name; as
posted it cannot run (``forward`` reads an undefined name ``relu1``), which
``test_question_vs_answer.py`` pins: the question's *procedure* is studied
with ``torch_ref.question_step`` on the answer's model instead.
"""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()  # CHANGED: was super(Net, self).__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=5)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5)
        self.pool = nn.MaxPool2d(2, 2)
        self.relu = nn.ReLU()
        self.linear = nn.Linear(64 * 5 * 5, 10)

    def forward(self, input):
        conv1 = self.conv1(input)
        pool1 = self.pool(conv1)
        self.relu1 = self.relu(pool1)
        conv2 = self.conv2(self.relu1)
        pool2 = self.pool(conv2)
        self.relu2 = self.relu(pool2)
        relu2 = self.relu2.view(self.relu2.size(0), -1)
        return self.linear(relu2)


def loop_body(model, optimizer, input, label, grad_penalty_weight):  # CHANGED: a function, see above
    output = model(input)
    loss = nn.CrossEntropyLoss()(output, label)

    # This is where the activation gradients are computed
    # only_inputs is optional here, since we're going to call optimizer.zero_grad() later
    # But it makes clear that we're *only* interested in the activation gradients at this point
    # (only_inputs is deprecated and ignored by current PyTorch; True is its default, so no warning.)
    grads = torch.autograd.grad(loss, [model.relu1, model.relu2], create_graph=True, only_inputs=True)

    grad_norm = 0
    for grad in grads:
        grad_norm += grad.pow(2).sum()

    optimizer.zero_grad()
    loss = loss + grad_norm * grad_penalty_weight
    loss.backward()
    return loss  # CHANGED: optimizer.step() is left to the caller


class QuestionNet(nn.Module):  # CHANGED: the question calls it Net
    def __init__(self):
        super(QuestionNet, self).__init__()  # noqa: UP008 (verbatim)
        self.conv1 = nn.Conv2d(3, 32, kernel_size=5)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5)
        self.pool = nn.MaxPool2d(2, 2)
        self.relu = nn.ReLU()
        self.linear = nn.Linear(64 * 5 * 5, 10)

    def forward(self, input):
        conv1 = self.conv1(input)
        pool1 = self.pool(conv1)
        self.relu1 = self.relu(pool1)
        self.relu1.retain_grad()
        conv2 = self.conv2(relu1)  # noqa: F821 (verbatim: the question's bug, a NameError)
        pool2 = self.pool(conv2)
        relu2 = self.relu(pool2)
        self.relu2 = relu2.view(relu2.size(0), -1)
        self.relu2.retain_grad()
        return self.linear(relu2)
