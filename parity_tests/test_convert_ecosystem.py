"""The converter on models nobody wrote for this project: Hugging Face twins and zoo-style layers.

Two kinds of evidence. Small hand-written pairs pin each ecosystem rule
(non-persistent buffers, bare parameters such as ``cls_token``, Embedding's
``padding_idx``, ``register_rule``, bfloat16 and complex leaves, the ``target``
spelling of Flax list attributes and tied weights). And the Hugging Face
twins (the PyTorch and the Flax class of one model, ``transformers`` 4.x, tiny
configs, random weights, no download): the converter's tree equals, key for key
and bit for bit, what ``transformers.modeling_flax_pytorch_utils`` makes of the
same state dict, loads into the Flax class with no ``name_map``, gives its
logits, and the Flax class's own weights load back into PyTorch and round-trip
exactly.
"""

from __future__ import annotations

import types

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch import nn as tnn

import torch_ref
from parity_tests.convert_twins import assert_bit_exact, assert_twins, randomize_torch_
from parity_tests.harness import compare, fast_jit, jax_dtype, to_numpy
from torch_ref.convert import PaddingIdxWarning

# ----------------------------------------------------------------------- ecosystem rules


class PositionIds(tnn.Module):
    """A Linear next to index buffers that ``state_dict`` leaves out (as BERT's embeddings have)."""

    def __init__(self):
        super().__init__()
        self.proj = tnn.Linear(3, 2)
        self.register_buffer("position_ids", torch.arange(4), persistent=False)
        self.register_buffer("scale", torch.ones(2), persistent=False)


def test_non_persistent_buffers_are_neither_exported_nor_loaded():
    model = PositionIds()
    params = torch_ref.export_flax_params(model)
    assert set(traverse_util.flatten_dict(params, sep="/")) == {"proj/kernel", "proj/bias"}
    torch_ref.load_flax_params(model, params)


class TinyViTTorch(tnn.Module):
    """A ViT's root owns ``cls_token`` and ``pos_embed`` itself (timm's layout)."""

    def __init__(self):
        super().__init__()
        self.patch = tnn.Conv2d(3, 8, 4, stride=4)
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = tnn.Parameter(torch.zeros(1, 5, 8))
        self.head = tnn.Linear(8, 3)

    def forward(self, x):  # (B, 3, 8, 8)
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, 4, 8)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(torch.tanh(tokens).mean(dim=1))  # (B, 3)


class TinyViTFlax(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # (B, 8, 8, 3)
        tokens = fnn.Conv(8, (4, 4), strides=4, padding="VALID", name="patch")(x).reshape(x.shape[0], 4, 8)
        cls_token = self.param("cls_token", fnn.initializers.zeros, (1, 1, 8))
        pos_embed = self.param("pos_embed", fnn.initializers.zeros, (1, 5, 8))
        cls_tokens = jnp.broadcast_to(cls_token, (x.shape[0], 1, 8))
        tokens = jnp.concatenate([cls_tokens, tokens], axis=1) + pos_embed
        return fnn.Dense(3, name="head")(jnp.tanh(tokens).mean(axis=1))


class Scaled(tnn.Module):
    """A module of one's own with a parameter next to a known layer."""

    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(1, 2, 3)
        self.scale = tnn.Parameter(torch.full((2,), 3.0))


def test_parameters_outside_known_layers_map_by_path_unchanged():
    model = tnn.Sequential(Scaled())
    params = torch_ref.export_flax_params(model)
    np.testing.assert_array_equal(params["0"]["scale"], np.full(2, 3.0, np.float32))
    assert set(params["0"]) == {"scale", "conv"}
    assert_twins(TinyViTTorch(), TinyViTFlax(), np.random.default_rng(0).normal(size=(2, 3, 8, 8)))


def test_embedding_with_padding_idx_warns_once_naming_the_fix():
    model = tnn.Sequential(tnn.Embedding(5, 3, padding_idx=0), tnn.Embedding(5, 3))
    with pytest.warns(PaddingIdxWarning, match=r"padding_idx at '0' \(row 0\): PyTorch gives that row no "
                                               r"gradient.*g\.at\[i\]\.set\(0\)") as caught:
        torch_ref.export_flax_params(model)
    assert len(caught) == 1


class MyLinear(tnn.Module):
    """y = x @ weight.T + shift with a (out, in) weight: the Flax twin is nn.Dense ((in, out) kernel)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = tnn.Parameter(torch.randn(n_out, n_in))
        self.shift = tnn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight.T + self.shift


class WrongShape(MyLinear):
    pass


class MLPTorch(tnn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out = MyLinear(3, 4), MyLinear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


class MLPFlax(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        return fnn.Dense(2, name="out")(jnp.tanh(fnn.Dense(4, name="hidden")(x)))


def test_a_registered_rule_converts_a_custom_layer_both_ways():
    torch_ref.register_rule(  # process-wide; MyLinear exists only in this module
        MyLinear,
        to_flax=lambda m, t: {"params": {"kernel": t["weight"].T, "bias": t["shift"]}},
        to_torch=lambda m, v: {"weight": v["params"]["kernel"].T, "shift": v["params"]["bias"]})
    assert_twins(MLPTorch(), MLPFlax(), np.random.default_rng(1).normal(size=(2, 3)))
    torch_ref.register_rule(
        WrongShape,
        to_flax=lambda m, t: {"params": {"kernel": t["weight"].T}},
        to_torch=lambda m, v: {"weight": v["params"]["kernel"]})  # forgot the transpose back
    params = torch_ref.export_flax_params(WrongShape(3, 2))
    with pytest.raises(ValueError, match=r"the rule of the root module \(WrongShape\) gives weight the shape "
                                         r"\(3, 2\), expected \(2, 3\)"):
        torch_ref.load_flax_params(WrongShape(3, 2), params)
    with pytest.raises(TypeError, match=r"module_type must be a torch\.nn\.Module subclass"):
        torch_ref.register_rule(int, to_flax=lambda m, t: t, to_torch=lambda m, v: v)


def test_bfloat16_leaves_load_exactly_and_complex_ones_are_refused():
    source = tnn.Linear(3, 2)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), torch_ref.export_flax_params(source))
    expected = np.asarray(params["kernel"], np.float32).T  # bfloat16 values are float32 values
    for dtype in (torch.float32, torch.bfloat16):
        target = torch_ref.load_flax_params(tnn.Linear(3, 2).to(dtype), params)
        assert target.weight.dtype == dtype
        np.testing.assert_array_equal(target.weight.detach().float().numpy(), expected)
    complex_params = {"kernel": np.asarray(params["kernel"], np.float32) + 1j, "bias": np.zeros(2)}
    target = tnn.Linear(3, 2)
    before = target.weight.detach().clone()
    with pytest.raises(ValueError, match=r"params\['kernel'\] is complex \(complex64\) but weight is "
                                         r"torch.float32: loading would drop the imaginary part"):
        torch_ref.load_flax_params(target, complex_params)
    assert torch.equal(target.weight, before)


class ListTorch(tnn.Module):
    """Numbered children and a head tied to the embedding (GPT-2's lm_head is wte)."""

    def __init__(self):
        super().__init__()
        self.embed = tnn.Embedding(7, 4)
        self.layer = tnn.ModuleList([tnn.Linear(4, 4), tnn.Linear(4, 4)])
        self.head = tnn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):  # (B, T)
        h = self.embed(tokens)
        for layer in self.layer:
            h = torch.tanh(layer(h))
        return self.head(h.mean(dim=1))  # (B, 7)


class ListFlax(fnn.Module):
    def setup(self):
        self.embed = fnn.Embed(7, 4)
        self.layer = [fnn.Dense(4), fnn.Dense(4)]  # Flax names a list attribute's modules layer_0, layer_1

    def __call__(self, tokens):
        h = self.embed(tokens)
        for layer in self.layer:
            h = jnp.tanh(layer(h))
        return self.embed.attend(h.mean(axis=1))  # the tied head: one weight in Flax


def test_target_spells_list_attributes_and_leaves_out_tied_duplicates():
    torch_model = ListTorch().double()
    tokens = np.array([[1, 2, 3], [4, 5, 6]])
    plain = torch_ref.export_flax_params(torch_model)
    assert set(plain) == {"embed", "layer", "head"}  # PyTorch's names, the tied head included
    with jax_dtype("float64"):
        target = ListFlax().init(jax.random.key(0), jnp.asarray(tokens))["params"]
        params = torch_ref.export_flax_params(torch_model, target=target)
        assert set(traverse_util.flatten_dict(params, sep="/")) == {
            "embed/embedding", "layer_0/kernel", "layer_0/bias", "layer_1/kernel", "layer_1/bias"}
        logits = ListFlax().apply({"params": params}, jnp.asarray(tokens))
    result = compare("logits", "float64", logits, to_numpy(torch_model(torch.from_numpy(tokens))))
    assert result.passed, result
    wrong = {**target, "layer_1": {**target["layer_1"], "kernel": jax.ShapeDtypeStruct((5, 4), jnp.float32)}}
    with pytest.raises(ValueError, match=r"params\['layer_1'\]\['kernel'\]: module 'layer\.1' \(Linear\) "
                                         r"gives shape \(4, 4\), the target has \(5, 4\)"):
        torch_ref.export_flax_params(torch_model, target=wrong)
    no_bias = {**target, "layer_1": {"kernel": target["layer_1"]["kernel"]}}
    with pytest.raises(ValueError, match=r"it gives leaves the target lacks "
                                         r"\[params\['layer'\]\['1'\]\['bias'\]\]"):
        torch_ref.export_flax_params(torch_model, target=no_bias)
    flax_params = jax.tree.map(lambda a: np.asarray(a, np.float64), target)  # the tree is the target
    torch_ref.load_flax_params(torch_model, flax_params)
    assert torch_model.head.weight is torch_model.embed.weight
    assert_bit_exact(torch_ref.export_flax_params(torch_model, target=target), flax_params)
    # With neither of the tied leaves given, both are missing (the tie is no excuse for either).
    with pytest.raises(ValueError, match=r"missing \[params\['embed'\]\['embedding'\], "
                                         r"params\['head'\]\['kernel'\]\]"):
        torch_ref.load_flax_params(torch_model, {k: v for k, v in flax_params.items() if k != "embed"})


# ---------------------------------------------------------------------- Hugging Face twins

transformers = pytest.importorskip("transformers")


def hf_converted(torch_model: tnn.Module, flax_model, flax_weights: dict) -> dict:
    """``transformers``' own PyTorch -> Flax conversion of the same state dict, as NumPy.

    It reads only the Flax model's ``params`` (for names and shapes) and
    ``base_model_prefix``; the model is built without its (op by op, slow) initialisation.
    """
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    state = {key: value.clone() for key, value in torch_model.state_dict().items()}
    stand_in = types.SimpleNamespace(params=flax_weights, base_model_prefix=flax_model.base_model_prefix)
    return jax.tree.map(np.asarray, convert_pytorch_state_dict_to_flax(state, stand_in))


def bert():
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, num_labels=3)
    return (transformers.BertForSequenceClassification(config),
            transformers.FlaxBertForSequenceClassification, config, (1, 4), "input_ids")


def gpt2():
    config = transformers.GPT2Config(vocab_size=30, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config), transformers.FlaxGPT2LMHeadModel, config, (1, 4), "input_ids"


def vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                    num_labels=3)
    return (transformers.ViTForImageClassification(config), transformers.FlaxViTForImageClassification,
            config, (1, 8, 8, 3), "pixel_values")


def resnet(layer_type: str = "bottleneck"):
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type=layer_type, num_labels=3)
    return (transformers.ResNetForImageClassification(config), transformers.FlaxResNetForImageClassification,
            config, (1, 16, 16, 3), "pixel_values")


def regnet():
    config = transformers.RegNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       groups_width=4, num_labels=3)
    return (transformers.RegNetForImageClassification(config), transformers.FlaxRegNetForImageClassification,
            config, (1, 16, 16, 3), "pixel_values")


def hf_inputs(kind: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "input_ids":
        return rng.integers(0, 30, size=(2, shape[1]))
    # HF's Flax image models cast pixels to float32: float32 values give both frameworks the same input.
    return rng.normal(size=(2, shape[3], shape[1], shape[2])).astype(np.float32).astype(np.float64)


def hf_twins(make):
    """(PyTorch model in float64 with random weights, Flax twin computing in float64, its own
    initial weights in float64, inputs); call inside ``jax_dtype("float64")``."""
    torch_model, flax_class, config, shape, kind = make()
    torch_model = torch_model.double().eval()
    randomize_torch_(torch_model, 0, persistent_only=True)
    flax_model = flax_class(config, input_shape=shape, dtype=jnp.float64, _do_init=False)
    # One compilation instead of op-by-op initialisation (25 s for the tiny ResNet on a loaded machine).
    init = fast_jit(flax_model.init_weights, static_argnums=1)
    flax_weights = jax.tree.map(lambda a: np.asarray(a, np.float64), init(jax.random.PRNGKey(0), shape))
    return torch_model, flax_model, flax_weights, {kind: hf_inputs(kind, shape)}


def logits_agree(torch_model: tnn.Module, forward, variables: dict, inputs: dict) -> None:
    logits = forward(jax.tree.map(jnp.asarray, variables), inputs)
    with torch.no_grad():
        expected = to_numpy(torch_model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits)
    result = compare("logits", "float64", logits, expected)
    assert result.passed, result


@pytest.mark.filterwarnings("ignore::torch_ref.convert.PaddingIdxWarning")  # BERT's word_embeddings
@pytest.mark.parametrize("make", [bert, gpt2, vit, resnet, regnet], ids=lambda f: f.__name__)
def test_hugging_face_twins_convert_as_transformers_does_and_load_both_ways(make):
    with jax_dtype("float64"):
        torch_model, flax_model, flax_weights, inputs = hf_twins(make)
        forward = fast_jit(lambda v, x: flax_model(**x, params=v).logits)
        example = {k: torch.from_numpy(v) for k, v in inputs.items()}
        ours = torch_ref.export_flax_variables(torch_model, example_input=example)
        theirs = hf_converted(torch_model, flax_model, flax_weights)
        if "batch_stats" not in flax_weights:  # transformers returns a bare params tree then
            theirs = {"params": theirs}
        assert_bit_exact(ours, theirs)
        logits_agree(torch_model, forward, ours if "batch_stats" in ours else ours["params"], inputs)
        # Flax -> PyTorch: the Flax class's own initialisation (float32 numbers), in float64.
        if "batch_stats" in flax_weights:
            torch_ref.load_flax_variables(torch_model, flax_weights)
            back = torch_ref.export_flax_variables(torch_model, target=flax_weights)
        else:
            torch_ref.load_flax_params(torch_model, flax_weights)
            back = torch_ref.export_flax_params(torch_model, target=flax_weights)
        assert_bit_exact(back, flax_weights)
        logits_agree(torch_model, forward, flax_weights, inputs)


def test_basic_block_resnet_needs_the_flax_tree_for_its_list_attribute_names():
    """HF's Flax basic block names its convolutions layer_0, layer_1 (a list attribute), PyTorch layer.0:
    ``transformers``' converter leaves them out, ``target=`` spells them as Flax does."""
    with jax_dtype("float64"):
        torch_model, flax_model, flax_weights, inputs = hf_twins(lambda: resnet("basic"))
        forward = fast_jit(lambda v, x: flax_model(**x, params=v).logits)
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), flax_weights)
        theirs = traverse_util.flatten_dict(hf_converted(torch_model, flax_model, shapes), sep="/")
        # transformers keeps PyTorch's name, which the Flax model does not have.
        assert "params/resnet/encoder/stages/0/layers/0/layer/0/convolution/kernel" in theirs
        ours = torch_ref.export_flax_variables(torch_model, target=shapes)
        assert "layer_0" in ours["params"]["resnet"]["encoder"]["stages"]["0"]["layers"]["0"]["layer"]
        logits_agree(torch_model, forward, ours, inputs)
        torch_ref.load_flax_variables(torch_model, flax_weights)
        assert_bit_exact(torch_ref.export_flax_variables(torch_model, target=flax_weights), flax_weights)
