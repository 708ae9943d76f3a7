"""The built-in ResNet-18 twins (jax_impl.resnet, torch_ref.resnet) compute the same penalised loss.

Cross-framework (imports JAX and PyTorch). The PyTorch model's weights are converted with
``torch_ref.export_flax_variables`` and no ``name_map`` (the twins share module paths), and both
frameworks penalise the same module outputs named by path, "." in PyTorch and "/" in Flax, with no
capture code in either model: a whole residual block (``layer1.0``) and a BatchNorm inside a strided
block (``layer2.0.bn1``). Float64, eval mode (running statistics) and train mode (batch statistics,
where the examples interact through BatchNorm), and the running statistics after the train step.

The default suite compares the twins with two stages of 2 and 1 blocks (``blocks=(2, 1)``): the
stem, an identity block followed by another, a strided block with its projection shortcut, the
pooling and the head, the kinds of module the full depth repeats (its stages 3 and 4 are stage 2's
code at other widths); one compilation of it costs a third of the full depth's. The full
ResNet-18 (2, 2, 2, 2) runs with ``-m slow``; by default its two twins are checked to hold the same
variables, names and shapes (traced, nothing compiled).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

import torch_ref
from jax_impl import penalized_loss
from jax_impl.resnet import RESNET18_BLOCKS
from jax_impl.resnet import ResNet18 as FlaxResNet18
from parity_tests.harness import fast_jit
from torch_ref.resnet import ResNet18 as TorchResNet18

# float64 rounding through double backprop and BatchNorm, two frameworks' kernel orders: >1000x headroom.
RTOL = 1e-10
CAPTURES = {"block": "layer1.0", "bn": "layer2.0.bn1"}
WEIGHT = 3.0


def normwise(actual, expected, what):
    """``max|a - b| <= RTOL * max|b|`` (see parity_tests/harness.py for why normwise)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err, scale = np.max(np.abs(actual - expected)), np.max(np.abs(expected))
    assert err <= RTOL * scale, f"{what}: max abs err {err:.3e} > {RTOL:.0e} * {scale:.3e}"


def nhwc(t: torch.Tensor) -> np.ndarray:
    a = t.detach().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def test_full_depth_twins_hold_the_same_variables():
    """Names and shapes of every parameter and running statistic of the full ResNet-18 (the default
    suite's numbers come from a shorter one)."""
    torch.manual_seed(0)
    net = TorchResNet18(in_channels=3, num_classes=5, width=4).double()
    x = np.zeros((1, 3, 8, 8))
    exported = torch_ref.export_flax_variables(net, example_input=torch.from_numpy(x))
    with jax.enable_x64(True):
        traced = jax.eval_shape(FlaxResNet18(num_classes=5, width=4).init, jax.random.key(0),
                                x.transpose(0, 2, 3, 1))

    def shapes(tree):
        return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}

    assert FlaxResNet18.blocks == RESNET18_BLOCKS == (2, 2, 2, 2)
    for collection in ("params", "batch_stats"):
        assert shapes(traced[collection]) == shapes(exported[collection]), collection
    assert "layer4/1/conv2/kernel" in shapes(traced["params"])


@pytest.fixture(scope="module", params=[
    pytest.param((2, 1), id="2,1-blocks"),
    pytest.param(RESNET18_BLOCKS, id="resnet18", marks=pytest.mark.slow),
])
def twins(request):
    blocks = request.param
    torch.manual_seed(0)
    net = TorchResNet18(in_channels=3, num_classes=5, width=4, blocks=blocks).double()
    rng = np.random.default_rng(0)
    x = rng.random((3, 3, 8, 8))
    with torch.no_grad():  # non-trivial running statistics
        net.train()
        net(torch.from_numpy(rng.random((6, 3, 8, 8))))
    net.eval()
    return net, blocks, x, np.array([0, 4, 2])


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_resnet18_twins_agree_on_penalty_and_every_gradient_by_module_path(twins, train):
    net, blocks, x, y = twins
    x_t = torch.from_numpy(x)
    with jax.enable_x64(True):
        variables = torch_ref.export_flax_variables(net, example_input=x_t)
        model = FlaxResNet18(num_classes=5, width=4, blocks=blocks)
        mutable = ("batch_stats",) if train else ()

        def total(params):
            apply = functools.partial(model.apply, train=train)
            return penalized_loss(params, apply, x.transpose(0, 2, 3, 1), y, penalty_weight=WEIGHT,
                                  capture_modules=CAPTURES, mutable=mutable,
                                  model_state={"batch_stats": variables["batch_stats"]})

        (total_j, aux), grads_j = fast_jit(jax.value_and_grad(total, has_aux=True))(variables["params"])
        total_j, aux, grads_j = jax.device_get((total_j, aux, grads_j))

    net.train(train)
    net.zero_grad(set_to_none=True)
    total_t, aux_t = torch_ref.penalized_loss(net, x_t, torch.from_numpy(y), WEIGHT, list(CAPTURES),
                                              capture_modules=CAPTURES)
    total_t.backward()
    normwise(aux["loss"], aux_t["loss"].item(), "loss")
    normwise(aux["penalty"], aux_t["penalty"].item(), "penalty")
    assert aux["penalty"] > 0
    normwise(total_j, total_t.item(), "total")
    for name in CAPTURES:
        normwise(aux["activation_grads"][name], nhwc(aux_t["activation_grads"][name]), f"dL/da[{name}]")
    with torch.no_grad():
        grads_t = torch_ref.export_flax_params(net, grads=True, example_input=x_t)
    flat_j = traverse_util.flatten_dict(grads_j, sep="/")
    flat_t = traverse_util.flatten_dict(grads_t, sep="/")
    assert set(flat_j) == set(flat_t)
    for key, g in flat_t.items():
        normwise(flat_j[key], g, f"grad[{key}]")
    if train:  # running statistics after the step: PyTorch's unbiased variance update, in both
        with torch.no_grad():
            stats_t = traverse_util.flatten_dict(torch_ref.export_flax_variables(net)["batch_stats"], sep="/")
        stats_j = traverse_util.flatten_dict(aux["model_state"]["batch_stats"], sep="/")
        for key, s in stats_t.items():
            normwise(stats_j[key], s, f"batch_stats[{key}]")
    net.eval()
