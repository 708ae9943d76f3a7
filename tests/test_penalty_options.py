"""The penalty's options (jax_impl only): their defining formulas, relations, and errors.

Float64 throughout, tiny models, so that identities hold to rounding.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jax_impl import (
    Net,
    cross_entropy_loss,
    is_penalty_step,
    lazy_penalty_weight,
    lazy_value_and_grad,
    penalized_loss,
)
from jax_impl.penalty import per_example_cross_entropy, zero_perturbations
from parity_tests.models_jax import MLP, ResNet

# Same math in another summation order: float64 rounding only.
RTOL = 1e-10
B = 6


@pytest.fixture(scope="module", autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def mlp_setup():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, 4, 4, 2)))
    y = jnp.asarray(rng.integers(0, 10, B))
    model = MLP(hidden=(16, 8))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(0), x)["params"])
    return model, params, x, y


def grad_of(model, params, x, y, **options):
    return jax.grad(lambda p: penalized_loss(p, model, x, y, **options)[0])(params)


def assert_trees_close(a, b, rtol, atol=0.0):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def test_explicit_defaults_are_bitwise_the_seed_recipe(mlp_setup):
    model, params, x, y = mlp_setup
    defaults = {"normalization": "batch_mean", "norm": "squared_l2", "approx": "exact", "layer_weights": None}
    plain = penalized_loss(params, model, x, y, penalty_weight=3.0)
    explicit = penalized_loss(params, model, x, y, penalty_weight=3.0, **defaults)
    assert set(plain[1]) == {"loss", "penalty", "penalty_terms", "activation_grads", "logits"}
    for u, v in zip(jax.tree.leaves(plain), jax.tree.leaves(explicit), strict=True):
        np.testing.assert_array_equal(u, v)
    # And the seed formula itself: loss + w * sum_l ||d loss / d a_l||^2.
    total, aux = plain
    manual = sum(jnp.sum(g**2) for g in aux["activation_grads"].values())
    np.testing.assert_allclose(total, cross_entropy_loss(aux["logits"], y) + 3.0 * manual, rtol=RTOL)


def test_batch_mean_penalty_is_per_example_penalty_over_batch_size(mlp_setup):
    """Independent examples: d loss / d a_i = (1/B) d loss_i / d a_i, so P_batch = P_per_example / B."""
    model, params, x, y = mlp_setup
    _, batch = penalized_loss(params, model, x, y, penalty_weight=1.0)
    _, per = penalized_loss(params, model, x, y, penalty_weight=1.0, normalization="per_example")
    np.testing.assert_allclose(batch["penalty"], per["penalty"] / B, rtol=RTOL)
    for name in batch["activation_grads"]:
        np.testing.assert_allclose(
            batch["activation_grads"][name] * B, per["activation_grads"][name], rtol=RTOL)
    # The training gradients obey the same relation: w_batch = B * w_per gives the same step.
    assert_trees_close(
        grad_of(model, params, x, y, penalty_weight=float(B)),
        grad_of(model, params, x, y, penalty_weight=1.0, normalization="per_example"),
        rtol=RTOL, atol=1e-15,
    )


def test_per_example_penalty_is_mean_of_each_examples_own_gradient_norm(mlp_setup):
    model, params, x, y = mlp_setup
    _, aux = penalized_loss(params, model, x, y, penalty_weight=1.0, normalization="per_example", norm="l2")
    one = []
    for i in range(B):  # each example alone: nothing to interact with
        _, a = penalized_loss(params, model, x[i : i + 1], y[i : i + 1], penalty_weight=1.0, norm="l2")
        one.append(a["penalty_terms"]["relu1"])
    np.testing.assert_allclose(aux["penalty_terms"]["relu1"], np.mean(one), rtol=RTOL)


def test_jacobian_path_equals_independent_path_when_examples_do_not_interact(mlp_setup):
    model, params, x, y = mlp_setup
    opts = {"penalty_weight": 2.0, "normalization": "per_example"}
    t_fast, a_fast = penalized_loss(params, model, x, y, examples_interact=False, **opts)
    t_jac, a_jac = penalized_loss(params, model, x, y, examples_interact=True, **opts)
    np.testing.assert_allclose(t_fast, t_jac, rtol=RTOL)
    assert_trees_close(a_fast["activation_grads"], a_jac["activation_grads"], rtol=RTOL, atol=1e-15)
    assert_trees_close(grad_of(model, params, x, y, examples_interact=True, **opts),
                       grad_of(model, params, x, y, examples_interact=False, **opts), rtol=RTOL, atol=1e-15)


def test_per_example_grads_with_batchnorm_are_diagonal_blocks_of_the_full_jacobian():
    """Train-mode BatchNorm couples examples: d loss_i / d a_i needs loss_i's gradient w.r.t. all of a."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 5, 5, 1)))
    y = jnp.asarray(rng.integers(0, 10, 4))
    model = ResNet(width=3)
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(jax.random.key(0), x))
    opts = {"model_state": {"batch_stats": variables["batch_stats"]}, "mutable": ["batch_stats"],
            "apply_kwargs": {"train": True}}
    _, aux = penalized_loss(variables["params"], model, x, y, penalty_weight=1.0,
                            normalization="per_example", **opts)
    zeros = zero_perturbations(model, variables["params"], x, **opts)

    def loss_i(perturbations, i):
        logits, _ = model.apply({"params": variables["params"], **opts["model_state"],
                                 "perturbations": traverse_util.unflatten_dict(perturbations, sep="/")},
                                x, train=True, mutable=["batch_stats"])
        return per_example_cross_entropy(logits, y)[i]

    for name in ("stem", "block1/relu"):
        brute = np.stack([jax.grad(loss_i)(zeros, i)[name][i] for i in range(4)])
        np.testing.assert_allclose(aux["activation_grads"][name], brute, rtol=RTOL, atol=1e-15)
    # Ignoring the interaction (one backward of sum_i loss_i) gives something else.
    _, wrong = penalized_loss(variables["params"], model, x, y, penalty_weight=1.0,
                              normalization="per_example", examples_interact=False, **opts)
    assert not np.allclose(wrong["penalty"], aux["penalty"], rtol=1e-3)
    assert set(aux["model_state"]) == {"batch_stats"}


def test_l2_norm_is_square_root_of_squared_norm_per_layer(mlp_setup):
    model, params, x, y = mlp_setup
    _, sq = penalized_loss(params, model, x, y, penalty_weight=1.0)
    _, l2 = penalized_loss(params, model, x, y, penalty_weight=1.0, norm="l2")
    for name, term in sq["penalty_terms"].items():
        np.testing.assert_allclose(l2["penalty_terms"][name], np.sqrt(term), rtol=RTOL)
    expected = sum(np.sqrt(t) for t in sq["penalty_terms"].values())
    np.testing.assert_allclose(l2["penalty"], expected, rtol=RTOL)


def test_l2_norm_of_an_all_zero_gradient_has_a_finite_training_gradient(mlp_setup):
    model, params, x, y = mlp_setup
    dead = jax.tree.map(jnp.copy, params)
    dead["dense2"]["bias"] = jnp.full_like(dead["dense2"]["bias"], -1e3)  # every relu2 unit dead
    _, aux = penalized_loss(dead, model, x, y, penalty_weight=1.0, norm="l2", layers="relu1")
    assert float(aux["penalty"]) == 0.0
    grads = grad_of(model, dead, x, y, penalty_weight=1.0, norm="l2", layers="relu1")
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_layer_weights_scale_each_term(mlp_setup):
    model, params, x, y = mlp_setup
    _, aux = penalized_loss(params, model, x, y, penalty_weight=1.0,
                            layer_weights={"relu1": 0.5, "relu2": 4.0})
    terms = aux["penalty_terms"]
    np.testing.assert_allclose(aux["penalty"], 0.5 * terms["relu1"] + 4.0 * terms["relu2"], rtol=RTOL)


def test_input_capture_is_the_input_gradient_double_backprop(mlp_setup):
    model, params, x, y = mlp_setup
    _, aux = penalized_loss(params, model, x, y, penalty_weight=1.0, layers="input")
    dx = jax.grad(lambda v: cross_entropy_loss(model.apply({"params": params}, v), y))(x)
    np.testing.assert_allclose(aux["activation_grads"]["input"], dx, rtol=RTOL)
    np.testing.assert_allclose(aux["penalty"], jnp.sum(dx**2), rtol=RTOL)


def test_input_capture_works_for_a_model_without_capture_points():
    import flax.linen as nn

    model = nn.Dense(3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)))
    y = jnp.array([0, 1, 2, 0])
    params = model.init(jax.random.key(0), x)["params"]
    _, aux = penalized_loss(params, model, x, y, penalty_weight=1.0, layers="input")
    assert aux["activation_grads"]["input"].shape == (4, 5)


@pytest.mark.parametrize("options", [
    {},
    {"normalization": "per_example"},
    {"norm": "l2", "layers": ["input", "relu2"], "layer_weights": {"input": 2.0}},
])
def test_finite_difference_error_shrinks_linearly_with_the_step(mlp_setup, options):
    """Error O(h) in both the penalty and its parameter gradient (Finlay & Oberman 2019)."""
    model, params, x, y = mlp_setup
    _, exact = penalized_loss(params, model, x, y, penalty_weight=1.0, **options)
    exact_grad = grad_of(model, params, x, y, penalty_weight=1.0, **options)

    def errors(h):
        _, aux = penalized_loss(params, model, x, y, penalty_weight=1.0, approx="finite_difference",
                                fd_step=h, **options)
        grad = grad_of(model, params, x, y, penalty_weight=1.0, approx="finite_difference", fd_step=h,
                       **options)
        value_err = abs(float(aux["penalty"] - exact["penalty"])) / float(exact["penalty"])
        diff = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), grad, exact_grad))
        scale = jax.tree.leaves(jax.tree.map(lambda a: jnp.max(jnp.abs(a)), exact_grad))
        return value_err, float(max(diff)) / float(max(scale))

    errs = [errors(h) for h in (1e-2, 1e-3, 1e-4)]
    for coarse, fine in itertools.pairwise(errs):
        # O(h): 10x smaller step, ~10x smaller error; 0.2 allows for the O(h^2) term and kinks of relu.
        assert fine[0] <= 0.2 * coarse[0] and fine[1] <= 0.2 * coarse[1], errs
    assert errs[-1][0] < 1e-3 and errs[-1][1] < 1e-3, errs


def test_lazy_penalty_weight_is_k_times_weight_every_k_steps():
    weights = [float(lazy_penalty_weight(s, 4, 2.5)) for s in range(9)]
    assert weights == [10.0, 0, 0, 0, 10.0, 0, 0, 0, 10.0]
    assert [bool(is_penalty_step(s, 3)) for s in range(4)] == [True, False, False, True]
    assert float(lazy_penalty_weight(7, 1, 2.5)) == 2.5


def test_lazy_gradient_is_plain_off_step_and_k_times_weighted_on_step(mlp_setup):
    model, params, x, y = mlp_setup
    every, w = 3, 0.7
    step_fn = jax.jit(lambda p, s: lazy_value_and_grad(p, model, x, y, step=s, every=every, penalty_weight=w))
    plain = jax.grad(lambda p: cross_entropy_loss(model.apply({"params": p}, x), y))(params)
    full = grad_of(model, params, x, y, penalty_weight=every * w)
    for step in range(4):
        (total, aux), grads = step_fn(params, step)
        if step % every == 0:
            assert_trees_close(grads, full, rtol=RTOL, atol=1e-15)
            assert float(aux["penalty"]) > 0
        else:
            assert_trees_close(grads, plain, rtol=RTOL, atol=1e-15)
            assert float(aux["penalty"]) == 0.0
            np.testing.assert_allclose(total, aux["loss"], rtol=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"normalization": "mean"}, r"normalization must be one of \('batch_mean', 'per_example'\)"),
    ({"norm": "l1"}, r"norm must be one of \('squared_l2', 'l2'\)"),
    ({"approx": "hutchinson"}, r"approx must be one of \('exact', 'finite_difference'\)"),
    ({"approx": "finite_difference", "fd_step": 0.0}, "fd_step must be a finite number > 0"),
    ({"layer_weights": {"relu9": 1.0}}, r"layer_weights names \['relu9'\]"),
    ({"layers": ["relu3"]}, r"unknown penalty layer.*relu3.*\['relu1', 'relu2'\].*'input'"),
])
def test_bad_options_raise_one_line_errors_naming_the_choices(mlp_setup, options, message):
    model, params, x, y = mlp_setup
    with pytest.raises(ValueError, match=message):
        penalized_loss(params, model, x, y, penalty_weight=1.0, **options)


def test_lazy_every_must_be_a_positive_int():
    with pytest.raises(ValueError, match="positive integer"):
        lazy_penalty_weight(0, 0, 1.0)


@pytest.mark.slow
def test_seed_net_accepts_all_options_under_jit():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 1)))
    y = jnp.array([3, 7])
    params = Net().init(jax.random.key(0), x)["params"]
    f = jax.jit(lambda p: penalized_loss(p, Net(), x, y, penalty_weight=1.0, normalization="per_example",
                                         norm="l2", layers=["input", "relu1"], approx="finite_difference")[0])
    assert np.isfinite(float(f(params)))


def test_an_apply_function_replaces_the_pass_through_keywords():
    """``functools.partial(model.apply, train=True)`` as ``model`` == the older ``apply_kwargs`` spelling."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 5, 5, 1)))
    y = jnp.asarray(rng.integers(0, 10, 3))
    model = ResNet(width=2)
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(jax.random.key(1), x))
    state = {"batch_stats": variables["batch_stats"]}
    common = {"penalty_weight": 2.0, "model_state": state, "mutable": ["batch_stats"]}
    params = variables["params"]
    old_total, old_aux = penalized_loss(params, model, x, y, apply_kwargs={"train": True}, **common)
    new_total, new_aux = penalized_loss(params, functools.partial(model.apply, train=True), x, y, **common)
    assert float(new_total) == float(old_total)
    assert_trees_close(new_aux["model_state"], old_aux["model_state"], rtol=0, atol=0)
    # In train mode the batch statistics move: the closure really reached the module.
    assert not np.allclose(new_aux["model_state"]["batch_stats"]["stem_bn"]["mean"],
                           state["batch_stats"]["stem_bn"]["mean"])
