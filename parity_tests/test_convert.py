"""The weight converter: the flatten-order permutation is pinned, round trips are bit-exact, errors are clear.

PyTorch flattens ``relu2`` (B, 64, 5, 5) as (c, h, w); Flax flattens (B, 5, 5, 64)
as (h, w, c). ``linear``'s kernel therefore needs its input axis permuted, not
just a transpose; these tests fail if that permutation is dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_ref
from jax_impl import Net
from parity_tests.harness import (
    DTYPES,
    TORCH_DTYPES,
    compare,
    identical_weights,
    jax_dtype,
    jax_inputs,
    make_batch,
    to_numpy,
    torch_inputs,
    torch_net,
)
from torch_ref.convert import linear_kernel_to_flax


def test_linear_kernel_rows_follow_the_nhwc_flatten_order():
    c, h, w, k = 64, 5, 5, 10
    weight = np.arange(k * c * h * w, dtype=np.float64).reshape(k, c * h * w)
    kernel = linear_kernel_to_flax(weight, (c, h, w))  # (h*w*c, k)
    for hi, wi, ci in [(0, 0, 1), (0, 1, 0), (1, 0, 0), (4, 3, 63), (2, 2, 17)]:
        # Flax row of (hi, wi, ci) in an NHWC flatten == PyTorch column of (ci, hi, wi) in NCHW.
        np.testing.assert_array_equal(kernel[(hi * w + wi) * c + ci], weight[:, (ci * h + hi) * w + wi])


def transpose_only_params(net: torch.nn.Module) -> dict:
    """The tempting wrong converter: every kernel transposed, the flatten order ignored."""
    params = torch_ref.export_flax_params(net)
    params["linear"]["kernel"] = to_numpy(net.linear.weight).T.copy()
    return params


def test_logits_agree_with_the_permutation_and_disagree_without_it():
    x, y = make_batch(3, 4, "float64")
    net = torch_net(0, "float64")
    expected = to_numpy(net(torch_inputs(x, y)[0]))
    with jax_dtype("float64"):
        xj, _ = jax_inputs(x, y)
        good = Net().apply({"params": jax.tree.map(jnp.asarray, torch_ref.export_flax_params(net))}, xj)
        naive = Net().apply({"params": jax.tree.map(jnp.asarray, transpose_only_params(net))}, xj)
    assert compare("logits", "float64", good, expected).passed
    wrong = compare("logits", "float64", naive, expected)
    assert not wrong.passed and wrong.max_rel > 1e-2, wrong


@pytest.mark.parametrize("dtype", DTYPES)
def test_flax_to_torch_to_flax_is_bit_exact(dtype):
    with jax_dtype(dtype):
        net, params = identical_weights(5, dtype, init_batch=1)  # Flax init -> load_flax_params
        original = jax.tree.map(np.asarray, params)
    back = torch_ref.export_flax_params(net)
    assert jax.tree.structure(back) == jax.tree.structure(original)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(original), strict=True):
        assert a.dtype == b.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_to_flax_to_torch_is_bit_exact(dtype):
    source = torch_net(1, dtype)
    target = torch_net(2, dtype)
    torch_ref.load_flax_params(target, torch_ref.export_flax_params(source))
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert a.dtype == b.dtype == TORCH_DTYPES[dtype], name
        assert torch.equal(a, b), name


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
    (without(good_params(), "linear"), r"flax params: .*missing \['linear'\]"),
    ({**good_params(), "conv3": good_params()["conv2"]}, r"flax params: .*unexpected \['conv3'\]"),
    (without(good_params(), "conv1", "bias"), r"flax params\['conv1'\]: .*missing \['bias'\]"),
    ({"params": good_params()}, r"pass the 'params' collection"),
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
     r"flax params\['conv1'\]\['kernel'\]: expected shape \(5, 5, 3, 32\), got \(32, 3, 5, 5\)"),
    (with_value("conv2", "bias", np.zeros(32, np.float32)),
     r"flax params\['conv2'\]\['bias'\]: expected shape \(64,\), got \(32,\)"),
    (with_value("linear", "kernel", np.zeros((10, 1600), np.float32)),  # PyTorch layout
     r"flax params\['linear'\]\['kernel'\]: expected shape \(1600, 10\), got \(10, 1600\)"),
    (with_value("conv1", "kernel", np.zeros((5, 5, 32), np.float32)),
     r"flax params\['conv1'\]\['kernel'\]: expected shape \(5, 5, 3, 32\), got \(5, 5, 32\)"),
], ids=["conv kernel in torch layout", "bias of another layer", "linear kernel in torch layout",
        "3-D kernel"])
def test_load_rejects_wrong_shapes(params, message):
    with pytest.raises(ValueError, match=message):
        torch_ref.load_flax_params(torch_ref.Net(), params)


def test_exporting_gradients_before_backward_says_so():
    with pytest.raises(ValueError, match=r"conv1.weight has no .grad; run backward\(\) first"):
        torch_ref.export_flax_params(torch_ref.Net(), grads=True)
