"""The converter's errors: what it cannot load or export is refused with a message naming it.

Loading refuses missing or extra keys, wrong shapes (and then leaves the module untouched), a
missing ``batch_stats`` collection and tied weights that disagree; exporting refuses gradients
before ``backward()`` and every module it cannot convert, naming the module and the reason.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from torch import nn as tnn

import torch_ref
from parity_tests.convert_twins import BatchNormTorch, WideTorch
from parity_tests.harness import to_numpy, torch_net


def good_params() -> dict:
    return torch_ref.export_flax_params(torch_net(0, "float32"))


def without(tree: dict, layer: str, name: str | None = None) -> dict:
    tree = {k: dict(v) for k, v in tree.items()}
    if name is None:
        del tree[layer]
    else:
        del tree[layer][name]
    return tree


@pytest.mark.parametrize(("params", "message"), [
    (without(good_params(), "linear"),
     r"missing \[params\['linear'\]\['bias'\], params\['linear'\]\['kernel'\]\]; unexpected \[\]"),
    ({**good_params(), "conv3": good_params()["conv2"]},
     r"missing \[\]; unexpected \[params\['conv3'\]\['bias'\], params\['conv3'\]\['kernel'\]\]"),
    (without(good_params(), "conv1", "bias"), r"missing \[params\['conv1'\]\['bias'\]\]"),
    ({"params": good_params()}, r"pass the 'params' collection \(variables\['params'\]\), or call "
                                r"load_flax_variables"),
], ids=["missing layer", "extra layer", "missing bias", "whole variables dict"])
def test_load_rejects_missing_or_extra_keys(params, message):
    with pytest.raises(ValueError, match=message):
        torch_ref.load_flax_params(torch_ref.Net(), params)


def with_value(layer: str, name: str, value: np.ndarray) -> dict:
    tree = good_params()
    tree[layer][name] = value
    return tree


@pytest.mark.parametrize(("params", "message"), [
    (with_value("conv1", "kernel", np.zeros((32, 3, 5, 5), np.float32)),  # OIHW passed as if HWIO
     r"params\['conv1'\]\['kernel'\]: expected shape \(5, 5, 3, 32\), got \(32, 3, 5, 5\)"),
    (with_value("conv2", "bias", np.zeros(32, np.float32)),
     r"params\['conv2'\]\['bias'\]: expected shape \(64,\), got \(32,\)"),
    (with_value("linear", "kernel", np.zeros((10, 1600), np.float32)),  # PyTorch layout
     r"params\['linear'\]\['kernel'\]: expected shape \(1600, 10\), got \(10, 1600\)"),
    (with_value("conv1", "kernel", np.zeros((5, 5, 32), np.float32)),
     r"params\['conv1'\]\['kernel'\]: expected shape \(5, 5, 3, 32\), got \(5, 5, 32\)"),
], ids=["conv kernel in torch layout", "bias of another layer", "linear kernel in torch layout",
        "3-D kernel"])
def test_load_rejects_wrong_shapes(params, message):
    with pytest.raises(ValueError, match=message):
        torch_ref.load_flax_params(torch_ref.Net(), params)


def test_failed_load_leaves_the_module_untouched_and_a_good_one_casts_to_its_dtype():
    net = torch_net(0, "float32")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = jax.tree.map(lambda a: a.astype(np.float64) + 1.0, good_params())  # every leaf differs
    params["linear"]["bias"] = np.zeros(11)  # ... and the last one checked has the wrong shape
    with pytest.raises(ValueError, match=r"params\['linear'\]\['bias'\]"):
        torch_ref.load_flax_params(net, params)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    params["linear"]["bias"] = np.zeros(10)
    torch_ref.load_flax_params(net, params)
    assert net.conv1.bias.dtype == torch.float32
    np.testing.assert_array_equal(to_numpy(net.conv1.bias), params["conv1"]["bias"].astype(np.float32))


def test_load_variables_requires_batch_stats_and_ignores_perturbations():
    model = BatchNormTorch()
    variables = torch_ref.export_flax_variables(model)
    with pytest.raises(ValueError, match=r"missing \[batch_stats\['block1'\]\['bn'\]\['mean'\]"):
        torch_ref.load_flax_variables(model, {"params": variables["params"]})
    torch_ref.load_flax_variables(model, {**variables, "perturbations": {"relu1": np.zeros(3)}})
    with pytest.raises(ValueError, match=r"unexpected \[cache\['k'\]\]"):
        torch_ref.load_flax_variables(model, {**variables, "cache": {"k": np.zeros(3)}})


def test_exporting_gradients_before_backward_names_the_tensor():
    with pytest.raises(ValueError, match=r"conv1.weight has no .grad \(for params\['conv1'\]\['kernel'\]\); "
                                         r"run backward\(\) first"):
        torch_ref.export_flax_params(torch_ref.Net(), grads=True)


class WithBuffer(tnn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.ones(3))


class GainLinear(tnn.Linear):
    def __init__(self):
        super().__init__(3, 2)
        self.gain = tnn.Parameter(torch.ones(2))


def holder(**children: tnn.Module) -> tnn.Module:
    module = tnn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


@pytest.mark.parametrize(("module", "message"), [
    (holder(enc=tnn.Sequential(tnn.Bilinear(2, 2, 3))),
     r"module 'enc\.0' \(Bilinear\) owns \['bias', 'weight'\] itself, and Bilinear is not a layer the "
     r"converter knows \(Conv1d, Conv2d, .*Embedding, MultiheadAttention, transformers' Conv1D; .*"
     r"torch_ref\.register_rule"),
    (holder(pos=WithBuffer()), r"module 'pos' \(WithBuffer\) owns the persistent buffers \['mask'\], which "
                               r"belong to no Flax collection"),
    (holder(fc=GainLinear()), r"module 'fc' \(GainLinear\) owns \['gain'\] besides the tensors its layer "
                              r"rule"),
    (holder(norm=tnn.LayerNorm((4, 3))), r"module 'norm' \(LayerNorm\) normalizes over \(4, 3\): only a 1-D"),
    (WideTorch(), r"module 'norm' \(LayerNorm\) reads 72 features after Conv2d 'conv' with 3 channels: "
                  r"72 = 3 x 24 is not a square map.*pass example_input"),
    (holder(up=tnn.ConvTranspose2d(4, 4, 3, groups=2)),
     r"module 'up' \(ConvTranspose2d\) has groups=2: Flax's nn.ConvTranspose has no feature groups"),
    (holder(attn=tnn.MultiheadAttention(4, 2, add_bias_kv=True)),
     r"module 'attn' \(MultiheadAttention\) owns \['bias_k', 'bias_v'\] besides the tensors its layer rule"),
], ids=["unknown layer type", "buffer", "extra parameter on a known layer", "multi-dimensional LayerNorm",
        "non-square flatten", "grouped transposed convolution", "attention with add_bias_kv"])
def test_unconvertible_modules_are_named(module, message):
    with pytest.raises(ValueError, match=message):
        torch_ref.export_flax_params(module)


def test_tied_weights_load_once_and_must_agree():
    model = holder(a=tnn.Linear(3, 3), b=tnn.Linear(3, 3))
    model.b.weight = model.a.weight
    params = torch_ref.export_flax_params(model)
    torch_ref.load_flax_params(model, params)
    params["b"]["kernel"] = params["b"]["kernel"] + 1.0
    with pytest.raises(ValueError, match=r"params\['a'\]\['kernel'\] and params\['b'\]\['kernel'\] load into "
                                         r"the same tensor a\.weight"):
        torch_ref.load_flax_params(model, params)
