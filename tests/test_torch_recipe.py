"""``agp_app.torch_recipe``: SGD with coupled or decoupled weight decay follows its written rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agp_app.torch_recipe import DecoupledSGD, make_optimizer, set_learning_rate


def _linear() -> torch.nn.Linear:
    model = torch.nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.copy_(torch.tensor([3.0]))
    return model


@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_follows_its_written_update_rule_with_a_rate_per_step(decoupled):
    lr, mu, wd = (0.1, 0.05), 0.9, 0.05
    model = _linear()
    opt = make_optimizer(model, lr=lr[0], momentum=mu, weight_decay=wd, decoupled=decoupled)
    x = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    p, m = np.array([1.0, -2.0, 3.0]), np.zeros(3)
    for rate in lr:
        set_learning_rate(opt, rate)
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        g = np.array([0.5, 0.25, 1.0])  # d(w.x + b)/d(w, b): constant
        if decoupled:
            m = mu * m + g
            p = p - rate * (m + wd * p)
        else:
            m = mu * m + (g + wd * p)
            p = p - rate * m
    got = np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy()])
    np.testing.assert_allclose(got, p, rtol=1e-14)  # a handful of float64 roundings


def test_optimizer_types_follow_the_weight_decay_form():
    model = _linear()
    assert type(make_optimizer(model, lr=0.1, momentum=0.9)) is torch.optim.SGD
    assert type(make_optimizer(model, lr=0.1, weight_decay=0.1, decoupled=False)) is torch.optim.SGD
    opt = make_optimizer(model, lr=0.1, weight_decay=0.1, decoupled=True)
    assert isinstance(opt, DecoupledSGD)
    assert opt.state_dict()["param_groups"][0]["decoupled_weight_decay"] == 0.1  # saved with checkpoints


def test_negative_weight_decay_is_refused():
    with pytest.raises(ValueError, match="--weight-decay must be >= 0"):
        make_optimizer(_linear(), lr=0.1, weight_decay=-1.0)
