"""torch_ref: capture points of any nn.Module by name (forward hooks), and the options' relations."""

import pytest
import torch

import torch_ref
from parity_tests.models_torch import MLP
from torch_ref.hooks import CaptureHooks, parse_capture_spec

# float64 rounding only: the same operations in another order.
RTOL, ATOL = 1e-10, 1e-14


@pytest.fixture
def net_and_batch():
    torch.manual_seed(0)
    net = torch_ref.Net(in_channels=1, image_size=16).double()
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 9])
    return net, x, y


def grads_of(net):
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("options", [{}, {"normalization": "per_example", "norm": "l2"}])
def test_hooks_on_the_reused_relu_match_the_nets_stored_activations(net_and_batch, options):
    net, x, y = net_and_batch
    results = []
    for capture_modules in (None, torch_ref.NET_CAPTURE_MODULES):
        net.zero_grad()
        total, _ = torch_ref.penalized_loss(net, x, y, 10.0, capture_modules=capture_modules, **options)
        total.backward()
        results.append((total.detach(), grads_of(net)))
    (t0, g0), (t1, g1) = results
    torch.testing.assert_close(t1, t0, rtol=RTOL, atol=0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_per_example_penalty_is_batch_size_times_batch_mean(net_and_batch):
    net, x, y = net_and_batch
    _, batch = torch_ref.penalized_loss(net, x, y, 1.0)
    _, per = torch_ref.penalized_loss(net, x, y, 1.0, normalization="per_example")
    torch.testing.assert_close(per["penalty"], batch["penalty"] * 4, rtol=RTOL, atol=0)


def test_hooks_record_and_shift_named_outputs():
    net = MLP(in_features=3, hidden=(4,))
    x = torch.randn(2, 3)
    with CaptureHooks(net, {"h": "act1"}) as hooks:
        out = net(x)
    h = hooks.check_complete()["h"]
    torch.testing.assert_close(out, net.head(h))
    shift = torch.ones(2, 4)
    with CaptureHooks(net, {"h": "act1"}, shifts={"h": shift}):
        shifted = net(x)
    torch.testing.assert_close(shifted, net.head(h + shift))
    assert not net.act1._forward_hooks  # hooks are removed on exit


def test_capture_specs_parse_and_bad_ones_name_the_fix():
    assert parse_capture_spec("block1.act_out") == ("block1.act_out", 0)
    assert parse_capture_spec("relu:1") == ("relu", 1)
    with pytest.raises(ValueError, match=r"'module.path:k'"):
        parse_capture_spec("relu:x")
    net = torch_ref.Net(in_channels=1, image_size=16)
    with pytest.raises(ValueError, match=r"no submodule 'relu9'; nearest paths: \['relu'\]"):
        CaptureHooks(net, {"a": "relu9"})
    with pytest.raises(ValueError, match=r"\['a'\] were not reached"):
        torch_ref.forward_with_captures(net, torch.zeros(1, 1, 16, 16), {"a": "relu:2"})


def test_lazy_weight_and_plain_steps():
    assert [torch_ref.lazy_penalty_weight(s, 3, 2.0) for s in range(4)] == [6.0, 0.0, 0.0, 6.0]
    with pytest.raises(ValueError, match="positive integer"):
        torch_ref.is_penalty_step(0, 0)
