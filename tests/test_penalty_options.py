"""The penalty's options (jax_impl only): their defining formulas, relations, and errors.

Float64 throughout, tiny models, so that identities hold to rounding. Each
(model, options) pair is compiled once (``penalised``) and shared by the tests
that use it, with the penalty weight a traced argument. Inputs are NumPy arrays and
the checks' own arithmetic is NumPy: an eager JAX op compiles a program per op and shape.
"""

import functools
import itertools

import flax.linen as nn
import jax
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
from parity_tests.harness import fast_jit
from parity_tests.models_jax import MLP, ResNet
from tests._model_fixtures import params_like, variables_like

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
    x = rng.normal(size=(B, 4, 4, 2))
    y = rng.integers(0, 10, B)
    model = MLP(hidden=(16, 8))
    return model, params_like(model, x), x, y


_COMPILED = {}


def penalised(model, **options):
    """``(params, x, y, weight) -> ((total, aux), grads)`` of ``penalized_loss(..., **options)``,
    compiled once per model, options (and shapes)."""
    key = (model, repr(sorted(options.items())))
    if key not in _COMPILED:
        def value_and_grad(params, x, y, weight):
            return jax.value_and_grad(
                lambda p: penalized_loss(p, model, x, y, penalty_weight=weight, **options), has_aux=True
            )(params)

        _COMPILED[key] = fast_jit(value_and_grad)
    return _COMPILED[key]


def evaluate(model, params, x, y, penalty_weight, **options):
    """``penalized_loss(params, model, x, y, penalty_weight=..., **options)``: ``(total, aux)``."""
    return penalised(model, **options)(params, x, y, penalty_weight)[0]


def grad_of(model, params, x, y, penalty_weight, **options):
    """The training gradient: d total / d params."""
    return penalised(model, **options)(params, x, y, penalty_weight)[1]


#: The mean cross-entropy of logits, compiled (eagerly each of its ~20 ops compiles on its own).
mean_cross_entropy = fast_jit(cross_entropy_loss)


@functools.cache
def plain_loss_grad(model):
    """d (mean cross-entropy) / d params, without the penalty machinery."""
    return fast_jit(jax.grad(lambda p, x, y: cross_entropy_loss(model.apply({"params": p}, x), y)))


def assert_trees_close(a, b, rtol, atol=0.0):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def test_explicit_defaults_are_bitwise_the_seed_recipe(mlp_setup):
    model, params, x, y = mlp_setup
    defaults = {"normalization": "batch_mean", "norm": "squared_l2", "approx": "exact", "layer_weights": None}
    plain = penalised(model)(params, x, y, 3.0)
    explicit = penalised(model, **defaults)(params, x, y, 3.0)
    assert set(plain[0][1]) == {"loss", "penalty", "penalty_terms", "activation_grads", "logits"}
    for u, v in zip(jax.tree.leaves(plain), jax.tree.leaves(explicit), strict=True):
        np.testing.assert_array_equal(u, v)
    # And the seed formula itself: loss + w * sum_l ||d loss / d a_l||^2.
    total, aux = plain[0]
    manual = sum(np.sum(np.asarray(g) ** 2) for g in aux["activation_grads"].values())
    np.testing.assert_allclose(total, mean_cross_entropy(aux["logits"], y) + 3.0 * manual, rtol=RTOL)


def test_batch_mean_penalty_is_per_example_penalty_over_batch_size(mlp_setup):
    """Independent examples: d loss / d a_i = (1/B) d loss_i / d a_i, so P_batch = P_per_example / B."""
    model, params, x, y = mlp_setup
    _, batch = evaluate(model, params, x, y, 1.0)
    _, per = evaluate(model, params, x, y, 1.0, normalization="per_example")
    batch, per = jax.tree.map(np.asarray, (batch, per))
    np.testing.assert_allclose(batch["penalty"], per["penalty"] / B, rtol=RTOL)
    for name in batch["activation_grads"]:
        np.testing.assert_allclose(
            batch["activation_grads"][name] * B, per["activation_grads"][name], rtol=RTOL)
    # The training gradients obey the same relation: w_batch = B * w_per gives the same step.
    assert_trees_close(
        grad_of(model, params, x, y, float(B)),
        grad_of(model, params, x, y, 1.0, normalization="per_example"),
        rtol=RTOL, atol=1e-15,
    )


def test_per_example_penalty_is_mean_of_each_examples_own_gradient_norm(mlp_setup):
    model, params, x, y = mlp_setup
    _, aux = evaluate(model, params, x, y, 1.0, normalization="per_example", norm="l2")
    one = []
    for i in range(B):  # each example alone: nothing to interact with
        _, a = evaluate(model, params, x[i : i + 1], y[i : i + 1], 1.0, norm="l2")
        one.append(a["penalty_terms"]["relu1"])
    np.testing.assert_allclose(aux["penalty_terms"]["relu1"], np.mean(one), rtol=RTOL)


def test_jacobian_path_equals_independent_path_when_examples_do_not_interact(mlp_setup):
    model, params, x, y = mlp_setup
    (t_fast, a_fast), g_fast = penalised(model, examples_interact=False, normalization="per_example")(
        params, x, y, 2.0)
    (t_jac, a_jac), g_jac = penalised(model, examples_interact=True, normalization="per_example")(
        params, x, y, 2.0)
    np.testing.assert_allclose(t_fast, t_jac, rtol=RTOL)
    assert_trees_close(a_fast["activation_grads"], a_jac["activation_grads"], rtol=RTOL, atol=1e-15)
    assert_trees_close(g_jac, g_fast, rtol=RTOL, atol=1e-15)


@pytest.fixture(scope="module")
def resnet_setup():
    """ResNet (train-mode BatchNorm: examples interact) with float64 variables, on a 4-example batch."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 5, 5, 1))
    y = rng.integers(0, 10, 4)
    model = ResNet(width=3)
    variables = variables_like(model, x, seed=1)
    return model, variables["params"], {"batch_stats": variables["batch_stats"]}, x, y


def test_per_example_grads_with_batchnorm_are_diagonal_blocks_of_the_full_jacobian(resnet_setup):
    """Train-mode BatchNorm couples examples: d loss_i / d a_i needs loss_i's gradient w.r.t. all of a."""
    model, params, state, x, y = resnet_setup
    opts = {"model_state": state, "mutable": ["batch_stats"], "apply_kwargs": {"train": True}}

    def per_example_aux(**interact):
        return fast_jit(lambda p: penalized_loss(p, model, x, y, penalty_weight=1.0,
                                                 normalization="per_example", **interact, **opts)[1])(params)

    aux = per_example_aux()  # examples_interact: True by default with batch_stats mutable

    @fast_jit
    def loss_i_grad(i):  # d loss_i / d (all perturbations) at zero: one row of the Jacobian
        def loss_i(perturbations):
            logits, _ = model.apply({"params": params, **state,
                                     "perturbations": traverse_util.unflatten_dict(perturbations, sep="/")},
                                    x, train=True, mutable=["batch_stats"])
            return per_example_cross_entropy(logits, y)[i]

        # The zeros made in this program (made eagerly, each capture point's zeros compile their own).
        return jax.grad(loss_i)(zero_perturbations(model, params, x, **opts))

    rows = [jax.tree.map(np.asarray, loss_i_grad(i)) for i in range(4)]
    for name in ("stem", "block1/relu"):
        brute = np.stack([rows[i][name][i] for i in range(4)])
        np.testing.assert_allclose(aux["activation_grads"][name], brute, rtol=RTOL, atol=1e-15)
    # Ignoring the interaction (one backward of sum_i loss_i) gives something else.
    wrong = per_example_aux(examples_interact=False)
    assert not np.allclose(wrong["penalty"], aux["penalty"], rtol=1e-3)
    assert set(aux["model_state"]) == {"batch_stats"}


def test_l2_norm_is_square_root_of_squared_norm_per_layer(mlp_setup):
    model, params, x, y = mlp_setup
    _, sq = evaluate(model, params, x, y, 1.0)
    _, l2 = evaluate(model, params, x, y, 1.0, norm="l2")
    for name, term in sq["penalty_terms"].items():
        np.testing.assert_allclose(l2["penalty_terms"][name], np.sqrt(term), rtol=RTOL)
    expected = sum(np.sqrt(t) for t in sq["penalty_terms"].values())
    np.testing.assert_allclose(l2["penalty"], expected, rtol=RTOL)


def test_l2_norm_of_an_all_zero_gradient_has_a_finite_training_gradient(mlp_setup):
    model, params, x, y = mlp_setup
    # A new tree, params' arrays shared (immutable), one bias replaced: every relu2 unit dead.
    dead = {**params, "dense2": {**params["dense2"], "bias": np.full(params["dense2"]["bias"].shape, -1e3)}}
    (_, aux), grads = penalised(model, norm="l2", layers="relu1")(dead, x, y, 1.0)
    assert float(aux["penalty"]) == 0.0
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_layer_weights_scale_each_term(mlp_setup):
    model, params, x, y = mlp_setup
    _, aux = evaluate(model, params, x, y, 1.0, layer_weights={"relu1": 0.5, "relu2": 4.0})
    terms = aux["penalty_terms"]
    np.testing.assert_allclose(aux["penalty"], 0.5 * terms["relu1"] + 4.0 * terms["relu2"], rtol=RTOL)


def test_input_capture_is_the_input_gradient_double_backprop(mlp_setup):
    model, params, x, y = mlp_setup
    _, aux = evaluate(model, params, x, y, 1.0, layers="input")
    dx = fast_jit(jax.grad(lambda v: cross_entropy_loss(model.apply({"params": params}, v), y)))(x)
    np.testing.assert_allclose(aux["activation_grads"]["input"], dx, rtol=RTOL)
    np.testing.assert_allclose(aux["penalty"], np.sum(np.asarray(dx) ** 2), rtol=RTOL)


def test_input_capture_works_for_a_model_without_capture_points():
    model = nn.Dense(3)
    x = np.random.default_rng(0).normal(size=(4, 5))
    y = np.array([0, 1, 2, 0])
    _, aux = evaluate(model, params_like(model, x), x, y, 1.0, layers="input")
    assert aux["activation_grads"]["input"].shape == (4, 5)


@pytest.mark.parametrize("options", [
    {},
    {"normalization": "per_example"},
    {"norm": "l2", "layers": ["input", "relu2"], "layer_weights": {"input": 2.0}},
])
def test_finite_difference_error_shrinks_linearly_with_the_step(mlp_setup, options):
    """Error O(h) in both the penalty and its parameter gradient (Finlay & Oberman 2019)."""
    model, params, x, y = mlp_setup
    (_, exact), exact_grad = jax.tree.map(np.asarray, penalised(model, **options)(params, x, y, 1.0))
    steps = (1e-2, 1e-3, 1e-4)

    def approximation(params, x, y, h):
        return jax.value_and_grad(lambda p: penalized_loss(
            p, model, x, y, penalty_weight=1.0, approx="finite_difference", fd_step=h, **options),
            has_aux=True)(params)

    # The three steps in one program (fd_step is static): one compilation instead of three.
    approximations = fast_jit(lambda params, x, y: [approximation(params, x, y, h) for h in steps])

    def errors(approximation):
        (_, aux), grad = jax.tree.map(np.asarray, approximation)
        value_err = abs(float(aux["penalty"] - exact["penalty"])) / float(exact["penalty"])
        diff = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), grad, exact_grad))
        scale = jax.tree.leaves(jax.tree.map(lambda a: np.max(np.abs(a)), exact_grad))
        return value_err, float(max(diff)) / float(max(scale))

    errs = [errors(a) for a in approximations(params, x, y)]
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
    step_fn = fast_jit(
        lambda p, s: lazy_value_and_grad(p, model, x, y, step=s, every=every, penalty_weight=w))
    plain = plain_loss_grad(model)(params, x, y)
    full = grad_of(model, params, x, y, every * w)
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
    x = np.random.default_rng(2).normal(size=(2, 16, 16, 1))
    y = np.array([3, 7])
    # Weights of init's shapes and dtype (float32) from NumPy: eager init compiled ~60 programs.
    params = params_like(Net(), x, dtype=np.float32)
    options = {"normalization": "per_example", "norm": "l2", "layers": ["input", "relu1"],
               "approx": "finite_difference"}
    f = fast_jit(lambda p: penalized_loss(p, Net(), x, y, penalty_weight=1.0, **options)[0])
    assert np.isfinite(float(f(params)))


def test_an_apply_function_replaces_the_pass_through_keywords(resnet_setup):
    """``functools.partial(model.apply, train=True)`` as ``model`` == the older ``apply_kwargs`` spelling."""
    model, params, state, x, y = resnet_setup
    common = {"penalty_weight": 2.0, "model_state": state, "mutable": ["batch_stats"]}
    old_total, old_aux = fast_jit(
        lambda p: penalized_loss(p, model, x, y, apply_kwargs={"train": True}, **common))(params)
    new_total, new_aux = fast_jit(
        lambda p: penalized_loss(p, functools.partial(model.apply, train=True), x, y, **common))(params)
    assert float(new_total) == float(old_total)
    assert_trees_close(new_aux["model_state"], old_aux["model_state"], rtol=0, atol=0)
    # In train mode the batch statistics move: the closure really reached the module.
    assert not np.allclose(new_aux["model_state"]["batch_stats"]["stem_bn"]["mean"],
                           state["batch_stats"]["stem_bn"]["mean"])
