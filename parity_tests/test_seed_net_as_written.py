"""The seed answer's ``Net``, pasted as written, works with the project's API without extra arguments.

Cross-framework (PyTorch and JAX). ``parity_tests/seed_code.py`` holds the
answer's ``Net`` and loop body verbatim; nothing of ``torch_ref`` is used to
build them. ``torch_ref.penalized_loss`` reads the activations its
``forward`` stores (``self.relu1``, ``self.relu2``), and the converter moves
its weights to ``jax_impl.Net`` and back with no ``feature_shape`` or other hint.

The JAX side runs compiled: the penalty and gradients through
``comparisons.jax_quantities`` (the parity grid's compiled function, at the
batch of 7 that the grid and the max-pool tie checks use too), the option
totals in one program (``jax_option_totals``). Op by op they cost ~15 s.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

import torch_ref
from jax_impl import Net, PenaltyOptions, penalized_loss
from parity_tests import seed_code
from parity_tests.comparisons import jax_quantities
from parity_tests.harness import (
    TOLERANCES,
    assert_all_pass,
    compare,
    compare_trees,
    fast_jit,
    jax_dtype,
    jax_inputs,
    make_batch,
    torch_inputs,
)

WEIGHT = 10.0
BATCH = 7
OPTIONS = (
    {"norm": "l2"},
    {"normalization": "per_example", "layers": ("relu2",)},
    {"layer_weights": {"relu1": 0.5, "relu2": 2.0}},
)


def seed_net() -> torch.nn.Module:
    torch.manual_seed(3)
    return seed_code.Net().double()


@pytest.fixture
def seed_net_and_batch():
    x, y = make_batch(5, BATCH, "float64")
    return seed_net(), x, y


def _grads(net) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in net.named_parameters()}


def test_penalized_loss_equals_the_answers_loop_body_with_no_extra_argument(seed_net_and_batch):
    net, x, y = seed_net_and_batch
    xt, yt = torch_inputs(x, y)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001)
    expected = seed_code.loop_body(net, optimizer, xt, yt, WEIGHT)
    expected_grads = _grads(net)

    net.zero_grad()
    total, aux = torch_ref.penalized_loss(net, xt, yt, WEIGHT)
    total.backward()
    # The same operations in the same order as the answer's loop body: identical floats.
    assert total.item() == expected.item()
    for name, grad in _grads(net).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0)
    assert list(aux["activation_grads"]) == ["relu1", "relu2"]
    assert aux["activation_grads"]["relu1"].shape == (BATCH, 32, 14, 14)


def test_seed_net_weights_round_trip_and_give_the_jax_penalty(seed_net_and_batch):
    net, x, y = seed_net_and_batch
    params = torch_ref.export_flax_params(net)
    assert params["linear"]["kernel"].shape == (1600, 10)

    fresh = seed_code.Net().double()
    torch_ref.load_flax_params(fresh, params)
    for (name, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # a pure permutation of entries: bit-exact

    xt, yt = torch_inputs(x, y)
    total_t, aux_t = torch_ref.penalized_loss(net, xt, yt, WEIGHT)
    net.zero_grad()
    total_t.backward()
    with jax_dtype("float64"):  # penalized_loss and jax.grad of it, compiled (see the module docstring)
        jax_side = jax_quantities(jax.tree.map(np.asarray, params), x, y, WEIGHT)
    grads_j = traverse_util.unflatten_dict(
        {k[len("param_grad["):-1]: v for k, v in jax_side.items() if k.startswith("param_grad[")}, sep=".")
    comparisons = [
        compare("total", "float64", jax_side["total"], total_t.item()),
        compare("penalty", "float64", jax_side["penalty"], aux_t["penalty"].item()),
        *compare_trees("grad", "float64", grads_j, torch_ref.export_flax_params(net, grads=True)),
    ]
    assert all(c.tolerance == TOLERANCES["float64"] for c in comparisons)
    assert_all_pass(comparisons)


def test_stored_attributes_can_be_named_like_hooks_and_chosen_by_layer(seed_net_and_batch):
    net, x, y = seed_net_and_batch
    xt, yt = torch_inputs(x, y)
    by_attribute, _ = torch_ref.penalized_loss(net, xt, yt, WEIGHT,
                                               capture_modules={"relu1": "relu1", "relu2": "relu2"})
    by_hook, _ = torch_ref.penalized_loss(net, xt, yt, WEIGHT, capture_modules=torch_ref.NET_CAPTURE_MODULES)
    by_default, _ = torch_ref.penalized_loss(net, xt, yt, WEIGHT)
    torch.testing.assert_close(by_attribute, by_default, rtol=1e-14, atol=0)
    torch.testing.assert_close(by_hook, by_default, rtol=1e-14, atol=0)

    _, aux = torch_ref.penalized_loss(net, xt, yt, WEIGHT, layers="relu2")
    assert list(aux["penalty_terms"]) == ["relu2"]
    with pytest.raises(ValueError, match=r"did not store a tensor self.relu3.*capture_modules"):
        torch_ref.penalized_loss(net, xt, yt, WEIGHT, layers=["relu3"])


@pytest.fixture(scope="module")
def jax_option_totals():
    """``[(total with keywords, total with a PenaltyOptions)]`` per ``OPTIONS`` entry, one JAX program.

    Compiled with ``harness.fast_jit`` (XLA's effort only costs time here). Two
    spellings that trace to the same operations give the same number, as they
    did op by op; any other difference between them still shows.
    """
    x, y = make_batch(5, BATCH, "float64")
    params = jax.tree.map(np.asarray, torch_ref.export_flax_params(seed_net()))

    def totals(params, xj, yj):
        return [(penalized_loss(params, Net(), xj, yj, penalty_weight=WEIGHT, **options)[0],
                 penalized_loss(params, Net(), xj, yj, penalty_weight=WEIGHT,
                                options=PenaltyOptions(**options))[0]) for options in OPTIONS]

    with jax_dtype("float64"):
        return [(float(kw), float(obj)) for kw, obj in fast_jit(totals)(params, *jax_inputs(x, y))]


@pytest.mark.parametrize("index", range(len(OPTIONS)), ids=[str(o) for o in OPTIONS])
def test_options_object_and_keywords_mean_the_same_in_both_frameworks(seed_net_and_batch, jax_option_totals,
                                                                       index):
    options = OPTIONS[index]
    net, x, y = seed_net_and_batch
    xt, yt = torch_inputs(x, y)
    as_object = PenaltyOptions(**options)
    t_kw, _ = torch_ref.penalized_loss(net, xt, yt, WEIGHT, **options)
    t_obj, _ = torch_ref.penalized_loss(net, xt, yt, WEIGHT, options=as_object)
    assert t_kw.item() == t_obj.item()
    j_kw, j_obj = jax_option_totals[index]
    assert j_kw == j_obj
    assert_all_pass([compare("total", "float64", j_obj, t_obj.item())])
    # A keyword overrides the object's field.
    t_over, _ = torch_ref.penalized_loss(net, xt, yt, WEIGHT, options=as_object, norm="squared_l2")
    t_plain, _ = torch_ref.penalized_loss(net, xt, yt, WEIGHT, options=as_object.replace(norm="squared_l2"))
    assert t_over.item() == t_plain.item()
