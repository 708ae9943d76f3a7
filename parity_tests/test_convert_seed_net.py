"""The converter on the project's ``Net``: the flatten permutation, and bit-exact round trips.

Before ``linear``, Flax flattens ``relu2`` as (h, w, c) and PyTorch as (c, h, w): the converter
(``torch_ref.convert``) permutes the rows of the linear kernel, not only transposes it. These
tests pin that permutation, show that a transpose-only converter gives other logits, and check
that conversions of ``torch_ref.Net`` and of the seed answer's ``Net`` as written are pure
permutations (round trips bit-exact, both directions, both dtypes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_ref
from jax_impl import Net
from parity_tests import seed_code
from parity_tests.convert_twins import assert_bit_exact
from parity_tests.harness import (
    DTYPES,
    TORCH_DTYPES,
    compare,
    fast_jit,
    jax_dtype,
    jax_inputs,
    make_batch,
    to_numpy,
    torch_inputs,
    torch_net,
)
from torch_ref.convert import flatten_permutation, linear_kernel_to_flax


def test_linear_kernel_rows_follow_the_nhwc_flatten_order():
    c, h, w, k = 64, 5, 5, 10
    weight = np.arange(k * c * h * w, dtype=np.float64).reshape(k, c * h * w)
    kernel = linear_kernel_to_flax(weight, (c, h, w))  # (h*w*c, k)
    for hi, wi, ci in [(0, 0, 1), (0, 1, 0), (1, 0, 0), (4, 3, 63), (2, 2, 17)]:
        # Flax row of (hi, wi, ci) in an NHWC flatten == PyTorch column of (ci, hi, wi) in NCHW.
        np.testing.assert_array_equal(kernel[(hi * w + wi) * c + ci], weight[:, (ci * h + hi) * w + wi])


def test_flatten_permutation_matches_the_explicit_kernel_rule_and_an_nhwc_flatten():
    c, h, w = 3, 2, 4
    weight = np.arange(5 * c * h * w, dtype=np.float64).reshape(5, c * h * w)
    expected = linear_kernel_to_flax(weight, (c, h, w))
    np.testing.assert_array_equal(weight.T[flatten_permutation((c, h, w))], expected)
    # A map PyTorch already flattened in (h, w, c) order (after permute(0, 2, 3, 1)) needs no permutation.
    np.testing.assert_array_equal(flatten_permutation((c, h, w), (1, 2, 0)), np.arange(c * h * w))


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
        apply = fast_jit(Net().apply)
        good = apply({"params": torch_ref.export_flax_params(net)}, xj)
        naive = apply({"params": transpose_only_params(net)}, xj)
    assert compare("logits", "float64", good, expected).passed
    wrong = compare("logits", "float64", naive, expected)
    assert not wrong.passed and wrong.max_rel > 1e-2, wrong


@pytest.mark.parametrize("dtype", DTYPES)
def test_flax_to_torch_to_flax_is_bit_exact(dtype):
    with jax_dtype(dtype):  # jax_impl.Net's own params tree (no compilation: shapes only), random values
        tree = jax.eval_shape(Net().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), dtype))["params"]
    rng = np.random.default_rng(5)
    original = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(dtype), tree)
    net = torch_ref.load_flax_params(torch_net(5, dtype), original)
    assert_bit_exact(torch_ref.export_flax_params(net), original)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_to_flax_to_torch_is_bit_exact(dtype):
    source = torch_net(1, dtype)
    target = torch_net(2, dtype)
    torch_ref.load_flax_params(target, torch_ref.export_flax_params(source))
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert a.dtype == b.dtype == TORCH_DTYPES[dtype], name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_seed_answer_net_as_written_round_trips_bit_exact(dtype):
    torch.manual_seed(3)
    source = seed_code.Net().to(TORCH_DTYPES[dtype])
    target = torch_ref.load_flax_params(seed_code.Net().to(TORCH_DTYPES[dtype]),
                                        torch_ref.export_flax_params(source))
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_seed_answer_net_as_written_gives_jax_impl_net_logits():
    torch.manual_seed(4)
    net = seed_code.Net().double()
    x, y = make_batch(5, 3, "float64")
    expected = to_numpy(net(torch_inputs(x, y)[0]))
    with jax_dtype("float64"):
        logits = fast_jit(Net().apply)({"params": torch_ref.export_flax_params(net)}, jax_inputs(x, y)[0])
        result = compare("logits", "float64", logits, expected)
    assert result.passed, result


@pytest.mark.parametrize("image_size", [16, 28])
def test_torch_ref_net_at_other_image_sizes_needs_nothing_extra(image_size):
    torch.manual_seed(6)
    net = torch_ref.Net(in_channels=1, image_size=image_size).double()
    x, y = make_batch(7, 2, "float64", channels=1, size=image_size)
    with jax_dtype("float64"):
        logits = fast_jit(Net().apply)({"params": torch_ref.export_flax_params(net)}, jax_inputs(x, y)[0])
    result = compare("logits", "float64", logits, to_numpy(net(torch_inputs(x, y)[0])))
    assert result.passed, result
