"""Capture by module path (``capture_modules``): unmodified Linen, NNX and Hugging Face Flax models.

Each value is checked against an independent computation: the same network written with ``capture()``
marks at the same activations, or a "cut network" whose activation is a function argument, so that
``d loss / d a`` is an ordinary ``jax.grad``. Float64 throughout; tiny models.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, struct

from jax_impl import capture, capture_points, penalized_loss
from jax_impl import nnx as jnnx
from parity_tests.harness import fast_jit
from tests._model_fixtures import nnx_like, params_like

# Same arithmetic in another order (perturbation added by an interceptor vs by perturb): float64 rounding.
RTOL = 1e-12


@pytest.fixture(scope="module", autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


# --------------------------------------------------------------------------- Linen models


class Act(nn.Module):
    """A parameter-free module, called twice by ``Plain`` (``"act"``, ``"act:1"``)."""

    def __call__(self, x):
        return jnp.tanh(x)


class Pair(nn.Module):
    """Returns a tuple, as Hugging Face layers do: its capture point is element 0."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(5, name="inner")(x)
        return h, jnp.sum(h)


class Stage(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3), name="conv")(x)


class Plain(nn.Module):
    """An unmodified model: no capture() anywhere."""

    @nn.compact
    def __call__(self, x):
        x = Stage(name="stage")(x)  # (B, 6, 6, 4)
        act = Act(name="act")
        x = act(x)
        x = x.reshape(x.shape[0], -1)  # (B, 144)
        x, _ = Pair(name="pair")(x)  # (B, 5)
        x = act(x)
        return nn.Dense(3, name="head")(x)  # (B, 3)


class Marked(nn.Module):
    """``Plain`` with capture() marks at the activations ``PLAIN_CAPTURES`` names (same parameters)."""

    @nn.compact
    def __call__(self, x):
        x = capture(self, "c", Stage(name="stage")(x))
        x = capture(self, "a0", jnp.tanh(x))
        x = x.reshape(x.shape[0], -1)
        x, _ = Pair(name="pair")(x)
        x = capture(self, "p", x)
        x = capture(self, "a1", jnp.tanh(x))
        return nn.Dense(3, name="head")(x)


#: "." and "/" spellings, the k-th call of a reused module, a tuple output.
PLAIN_CAPTURES = {"c": "stage.conv", "a0": "act", "p": "pair", "a1": "act:1"}


@pytest.fixture(scope="module")
def plain_setup():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 6, 6, 2))
    y = np.array([0, 2, 1])
    return params_like(Plain(), x), x, y


def value_and_grad(model, **keywords):
    return fast_jit(jax.value_and_grad(
        lambda p, x, y: penalized_loss(p, model, x, y, penalty_weight=2.0, **keywords), has_aux=True))


def test_unmodified_linen_model_by_path_equals_capture_marks(plain_setup):
    params, x, y = plain_setup
    (total, aux), grads = value_and_grad(Plain(), capture_modules=PLAIN_CAPTURES)(params, x, y)
    (total_m, aux_m), grads_m = value_and_grad(Marked())(params, x, y)
    np.testing.assert_allclose(total, total_m, rtol=RTOL)
    for name in PLAIN_CAPTURES:
        np.testing.assert_allclose(aux["penalty_terms"][name], aux_m["penalty_terms"][name], rtol=RTOL)
        np.testing.assert_allclose(aux["activation_grads"][name], aux_m["activation_grads"][name],
                                   rtol=RTOL, atol=1e-15)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-15), grads, grads_m)
    assert float(aux["penalty"]) > 0


def test_layers_choose_among_capture_marks_and_paths(plain_setup):
    """A model with capture() marks and capture_modules: the penalty sees both kinds, ``layers`` picks."""
    params, x, y = plain_setup

    @fast_jit  # both in one program (eagerly, each primitive compiled on its own)
    def penalties(params, x, y):
        both = penalized_loss(params, Marked(), x, y, penalty_weight=1.0, capture_modules={"s": "stage"},
                              layers=["a1", "s"])[1]
        # stage's output is the activation Marked calls "c".
        marked = penalized_loss(params, Marked(), x, y, penalty_weight=1.0, layers=["a1", "c"])[1]
        return both["penalty"], marked["penalty"]

    both, marked = penalties(params, x, y)
    np.testing.assert_allclose(both, marked, rtol=RTOL)


def test_unknown_path_error_lists_the_nearest_called_paths(plain_setup):
    params, x, y = plain_setup
    nearest = r"no module at path 'stage/cnov'.*nearest called paths: \['stage/conv'"
    with pytest.raises(ValueError, match=nearest):
        penalized_loss(params, Plain(), x, y, penalty_weight=1.0, capture_modules={"z": "stage/cnov"})


def test_call_index_beyond_the_calls_says_how_many_there_were(plain_setup):
    params, x, y = plain_setup
    with pytest.raises(ValueError, match=r"module 'act' was called 2 time\(s\).*'act:2' asks for call 2"):
        penalized_loss(params, Plain(), x, y, penalty_weight=1.0, capture_modules={"z": "act:2"})


def test_penalty_over_zero_capture_points_raises_instead_of_zero(plain_setup):
    params, x, y = plain_setup
    with pytest.raises(ValueError, match="no capture points, so the penalty would be 0"):
        penalized_loss(params, Plain(), x, y, penalty_weight=1.0)


class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = capture(self, "a", nn.Dense(3, name="d1")(x))
        return capture(self, "a", nn.Dense(3, name="d2")(x))


def test_capture_name_used_twice_in_one_module_raises():
    x, y = np.ones((2, 4)), np.array([0, 1])
    params = params_like(Twice(), x)
    with pytest.raises(ValueError, match="capture point 'a' was reached 2 times"):
        penalized_loss(params, Twice(), x, y, penalty_weight=1.0)


def test_name_of_both_a_capture_mark_and_a_path_raises(plain_setup):
    params, x, y = plain_setup
    with pytest.raises(ValueError, match=r"\['c'\] are both capture\(\) points"):
        penalized_loss(params, Marked(), x, y, penalty_weight=1.0, capture_modules={"c": "stage"})


def test_all_zero_example_weights_raise_instead_of_nan(plain_setup):
    params, x, y = plain_setup
    with pytest.raises(ValueError, match="example_weights sum to 0"):
        penalized_loss(params, Marked(), x, y, penalty_weight=1.0, example_weights=np.zeros(3))


def test_finite_difference_step_lost_in_rounding_raises(plain_setup):
    params, x, y = plain_setup
    params32 = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    # The check reads the activations' dtype, so tracing raises it: eval_shape computes nothing.
    with pytest.raises(ValueError, match=r"fd_step=1e-30 is too small for float32"):
        jax.eval_shape(lambda: penalized_loss(params32, Marked(), x.astype(np.float32), y, penalty_weight=1.0,
                                              approx="finite_difference", fd_step=1e-30))


def test_capture_points_list_every_call_with_its_output_shape(plain_setup):
    params, x, _ = plain_setup
    expected = {"stage": (3, 6, 6, 4), "stage/conv": (3, 6, 6, 4), "act": (3, 6, 6, 4), "pair": (3, 5),
                "pair/inner": (3, 5), "act:1": (3, 5), "head": (3, 3)}
    assert capture_points(Plain(), x) == expected  # params from model.init's shapes
    points = capture_points(Marked(), x, params)
    assert list(points)[-4:] == ["a0", "a1", "c", "p"]  # the capture() marks after the paths
    assert points["a0"] == (3, 6, 6, 4) and points["p"] == (3, 5)


# --------------------------------------------------------------------------- inputs and outputs


class TwoInputs(nn.Module):
    @nn.compact
    def __call__(self, a, b):
        h = Act(name="act")(nn.Dense(4, name="da")(a) + nn.Dense(4, name="db")(b))  # (B, 4)
        return nn.Dense(3, name="head")(h)


def cut_penalty(head_params, activation, y, logits_of=lambda z: z):
    """``||d loss / d a||^2`` with ``a`` the input of a Dense(3) head: an ordinary gradient."""
    def loss(a):
        logits = nn.Dense(3).apply({"params": head_params}, a)
        return optax.softmax_cross_entropy_with_integer_labels(logits_of(logits), y).mean()

    return jnp.sum(jax.grad(loss)(activation) ** 2)


def test_tuple_and_dict_inputs_give_the_penalty_of_the_cut_network():
    rng = np.random.default_rng(1)
    a, b, y = rng.normal(size=(3, 2)), rng.normal(size=(3, 5)), np.array([2, 0, 1])
    model = TwoInputs()
    params = params_like(model, a, b)

    @fast_jit  # everything in one program (eagerly, each primitive compiled on its own)
    def penalties_and_expected(params, a, b):
        activation = nn.tanh(nn.Dense(4).apply({"params": params["da"]}, a)
                             + nn.Dense(4).apply({"params": params["db"]}, b))
        penalties = [penalized_loss(params, model, x, y, penalty_weight=1.0, capture_modules={"h": "act"})[1][
            "penalty"] for x in [(a, b), {"a": a, "b": b}]]
        return penalties, cut_penalty(params["head"], activation, y)

    penalties, expected = penalties_and_expected(params, a, b)
    for penalty in penalties:
        np.testing.assert_allclose(penalty, expected, rtol=RTOL)


class Tokens(nn.Module):
    @nn.compact
    def __call__(self, ids):
        e = nn.Embed(11, 4, name="embed")(ids)  # (B, L, 4)
        return nn.Dense(3, name="head")(e.mean(axis=1))


def test_integer_token_inputs_penalise_the_embedding_output():
    ids, y = np.array([[1, 5, 7], [3, 3, 10]]), np.array([1, 2])
    params = params_like(Tokens(), ids)
    embedded = np.asarray(params["embed"]["embedding"])[ids]  # (2, 3, 4)

    def loss(e):
        logits = nn.Dense(3).apply({"params": params["head"]}, e.mean(axis=1))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @fast_jit  # both in one program (eagerly, each primitive compiled on its own)
    def penalty_and_reference(params, embedded):
        aux = penalized_loss(params, Tokens(), ids, y, penalty_weight=1.0, capture_modules={"e": "embed"})[1]
        return aux["penalty"], jnp.sum(jax.grad(loss)(embedded) ** 2)

    penalty, expected = penalty_and_reference(params, embedded)
    np.testing.assert_allclose(penalty, expected, rtol=RTOL)
    with pytest.raises(ValueError, match="'input' capture needs x to be one floating-point array"):
        penalized_loss(params, Tokens(), ids, y, penalty_weight=1.0, layers=["input"])


@struct.dataclass
class ClassifierOutput:
    hidden: jax.Array
    logits: jax.Array


class WithLogits(nn.Module):
    """Returns an output object with ``.logits`` (as Hugging Face's classifiers do), logits second."""

    @nn.compact
    def __call__(self, x):
        h = Act(name="act")(nn.Dense(4, name="body")(x))
        return ClassifierOutput(hidden=h, logits=nn.Dense(3, name="head")(h))


def test_default_loss_reads_the_logits_attribute_of_the_output():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(3, 2)), np.array([0, 1, 2])
    params = params_like(WithLogits(), x)

    @fast_jit  # everything in one program (eagerly, each primitive compiled on its own)
    def default_custom_and_expected(params, x):
        activation = nn.tanh(nn.Dense(4).apply({"params": params["body"]}, x))
        aux = penalized_loss(params, WithLogits(), x, y, penalty_weight=1.0, capture_modules={"h": "act"})[1]
        doubled = lambda out, labels: 2.0 * optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            out.logits, labels)
        custom = penalized_loss(params, WithLogits(), x, y, penalty_weight=1.0, capture_modules={"h": "act"},
                                loss_fn=doubled)[1]
        return aux, custom, cut_penalty(params["head"], activation, y)

    aux, custom, expected = default_custom_and_expected(params, x)
    np.testing.assert_allclose(aux["penalty"], expected, rtol=RTOL)
    assert aux["logits"].shape == (3, 3)  # the .logits field, not the first one (hidden, (3, 4))
    np.testing.assert_allclose(custom["penalty"], 4.0 * aux["penalty"], rtol=RTOL)  # (2 g)^2


class Wrapped(nn.Module):
    """A submodule whose output object holds two arrays (as a Hugging Face base model's does)."""

    @nn.compact
    def __call__(self, x):
        return WithLogits(name="inner")(x).logits


def test_capturing_an_output_object_with_several_arrays_is_refused():
    # Perturbing its first field could leave the loss unchanged (the model may read the other): a
    # silent 0, so it is refused, as torch_ref refuses it.
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(3, 2)), np.array([0, 1, 2])
    params = params_like(Wrapped(), x)
    with pytest.raises(TypeError, match=r"several array fields \['hidden', 'logits'\]"):
        penalized_loss(params, Wrapped(), x, y, penalty_weight=1.0, capture_modules={"h": "inner"})


# --------------------------------------------------------------------------- Hugging Face


def test_hugging_face_bert_penalised_at_two_encoder_layers_equals_the_cut_network():
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert import modeling_flax_bert as hf_bert

    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     vocab_size=50, intermediate_size=32, max_position_embeddings=16,
                                     num_labels=3)
    model = transformers.FlaxBertForSequenceClassification(config, dtype=jnp.float64, _do_init=False)
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 50, (2, 5))
    mask = np.ones((2, 5), np.int64)
    mask[1, 3:] = 0
    x, y = {"input_ids": ids, "attention_mask": mask}, np.array([0, 2])
    positions = np.broadcast_to(np.arange(5), ids.shape)
    params = params_like(model.module, ids, mask, np.zeros_like(ids), positions, None, dtype=np.float64)
    captures = {"l0": "bert/encoder/layer/0", "l1": "bert.encoder.layer.1"}

    def cut(a0, a1):  # the same network assembled from Hugging Face's own submodules, a0/a1 added by hand
        bert = params["bert"]
        h = hf_bert.FlaxBertEmbeddings(config, dtype=jnp.float64).apply(
            {"params": bert["embeddings"]}, ids, np.zeros_like(ids), positions, mask, deterministic=True)
        for k, a in enumerate((a0, a1)):
            h = hf_bert.FlaxBertLayer(config, dtype=jnp.float64).apply(
                {"params": bert["encoder"]["layer"][str(k)]}, h, mask, None, deterministic=True)[0] + a
        pooled = hf_bert.FlaxBertPooler(config, dtype=jnp.float64).apply({"params": bert["pooler"]}, h)
        logits = nn.Dense(3).apply({"params": params["classifier"]}, pooled)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @fast_jit  # both in one program: one compilation
    def penalty_and_cut_gradients(params):
        aux = penalized_loss(params, model, x, y, penalty_weight=1.0, capture_modules=captures)[1]
        zero = jnp.zeros((2, 5, 16))
        return aux, jax.grad(cut, argnums=(0, 1))(zero, zero)

    aux, (g0, g1) = penalty_and_cut_gradients(params)
    # Same network, same order of operations but for the interceptor's additions of zero: float64 rounding.
    np.testing.assert_allclose(aux["penalty_terms"]["l0"], jnp.sum(g0**2), rtol=1e-10)
    np.testing.assert_allclose(aux["penalty_terms"]["l1"], jnp.sum(g1**2), rtol=1e-10)
    assert float(aux["penalty"]) > 0 and np.isfinite(float(aux["penalty"]))


# --------------------------------------------------------------------------- NNX


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        h = self.dense(x)
        return h, jnp.sum(h)  # a tuple: element 0 is the capture point


class NnxAct(nnx.Module):
    def __call__(self, x):
        return jnp.tanh(x)


class NnxPlain(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([NnxBlock(rngs), NnxBlock(rngs)])
        self.act = NnxAct()
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x, _ = layer(x)
            x = self.act(x)
        return self.head(x)


class NnxMarked(NnxPlain):
    def __call__(self, x):
        for k, layer in enumerate(self.layers):
            x, _ = layer(x)
            x = jnnx.capture(self, f"b{k}", x)
            x = jnnx.capture(self, f"a{k}", self.act(x))
        return self.head(x)


NNX_CAPTURES = {"b0": "layers/0", "a0": "act", "b1": "layers.1", "a1": "act:1"}


@pytest.fixture(scope="module")
def nnx_setup():
    x = np.random.default_rng(4).normal(size=(3, 4))
    return x, np.array([0, 1, 2])


def nnx_value_and_grad(model, x, y, **keywords):
    graphdef, state = nnx.split(model)

    @fast_jit
    def run(state):
        return nnx.value_and_grad(
            lambda m: jnnx.penalized_loss(m, x, y, penalty_weight=2.0, **keywords), has_aux=True,
        )(nnx.merge(graphdef, state))

    return run(state)


def test_unmodified_nnx_model_by_attribute_path_equals_capture_marks(nnx_setup):
    x, y = nnx_setup
    plain = nnx_like(NnxPlain, dtype=np.float64)
    marked = nnx_like(NnxMarked, dtype=np.float64)  # same draws: same weights
    (total, aux), grads = nnx_value_and_grad(plain, x, y, capture_modules=NNX_CAPTURES)
    (total_m, aux_m), grads_m = nnx_value_and_grad(marked, x, y)
    np.testing.assert_allclose(total, total_m, rtol=RTOL)
    for name in NNX_CAPTURES:
        np.testing.assert_allclose(aux["penalty_terms"][name], aux_m["penalty_terms"][name], rtol=RTOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-15),
                 nnx.to_pure_dict(grads), nnx.to_pure_dict(grads_m))
    assert type(plain.act) is NnxAct  # the model's classes are untouched after the forward passes


def test_nnx_capture_points_and_errors(nnx_setup):
    x, y = nnx_setup
    plain = nnx_like(NnxPlain, dtype=np.float64)
    assert jnnx.capture_points(plain, x) == {
        "layers/0": (3, 4), "layers/0/dense": (3, 4), "act": (3, 4), "layers/1": (3, 4),
        "layers/1/dense": (3, 4), "act:1": (3, 4), "head": (3, 3)}
    with pytest.raises(ValueError, match=r"nearest called paths: \['layers/0'"):
        jnnx.penalized_loss(plain, x, y, penalty_weight=1.0, capture_modules={"z": "layrs/0"})
    with pytest.raises(ValueError, match="no capture points, so the penalty would be 0"):
        jnnx.penalized_loss(plain, x, y, penalty_weight=1.0)


class NnxTwice(nnx.Module):
    def __init__(self, rngs):
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = jnnx.capture(self, "a", x * 2.0)
        return self.head(jnnx.capture(self, "a", x + 1.0))


def test_nnx_capture_name_used_twice_raises(nnx_setup):
    x, y = nnx_setup
    with pytest.raises(ValueError, match="capture point 'a' was reached 2 times"):
        jnnx.penalized_loss(nnx_like(NnxTwice, dtype=np.float64), x, y, penalty_weight=1.0)
