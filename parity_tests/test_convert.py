"""The general weight converter (``torch_ref.convert``): layouts, flatten order, names, round trips, errors.

Each model pair below is a PyTorch model and its hand-written Flax twin with
the same layer names. They must give the same logits in both directions
(PyTorch weights exported to Flax; Flax weights loaded into PyTorch), and a
round trip must give back the very same bits. PyTorch flattens a (B, C, H, W)
map as (c, h, w) and Flax a (B, H, W, C) map as (h, w, c): a ``Linear`` (or a
normalisation) reading a flattened map needs its feature axis permuted, not
just a transpose; these tests fail if that permutation is dropped or misplaced.
The Flax forward passes are compiled with ``harness.fast_jit``: what is checked
is where each weight lands, which XLA's optimisation effort (rounding only)
cannot change.
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch import nn as tnn

import torch_ref
from jax_impl import Net
from parity_tests import seed_code
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

# --------------------------------------------------------------------------- helpers


def assert_bit_exact(actual: dict, expected: dict) -> None:
    flat_a, flat_e = traverse_util.flatten_dict(actual), traverse_util.flatten_dict(expected)
    assert set(flat_a) == set(flat_e)
    for key, value in flat_e.items():
        assert np.asarray(flat_a[key]).dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(flat_a[key], value, err_msg=str(key))


def randomize_torch_(module: tnn.Module, seed: int) -> None:
    """Every weight and running statistic random (variances positive): no default 0/1 hides a mistake."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
            else:
                t.copy_(0.5 * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def randomize_flax(variables: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(variables)
    return traverse_util.unflatten_dict({
        key: rng.random(v.shape) + 0.5 if key[-1] == "var" else 0.5 * rng.normal(size=v.shape)
        for key, v in flat.items()
    })


def assert_twins(torch_model: tnn.Module, flax_model: fnn.Module, x: np.ndarray, seed: int = 0,
                 channels_last: bool | None = None, **convert) -> None:
    """Same logits in float64 both ways, and Flax -> PyTorch -> Flax is bit-exact.

    ``x`` is the PyTorch input: NCHW images (Flax gets them NHWC), channels-first
    maps of any rank (``channels_last=True``: Flax gets the channel axis last),
    integer tokens or (B, T, E) sequences.
    """
    torch_model = torch_model.double().eval()
    xt = torch.from_numpy(x)
    if channels_last is None:
        channels_last = x.ndim == 4
    with jax_dtype("float64"):
        xf = jnp.asarray(np.moveaxis(x, 1, -1) if channels_last else x)
        apply = fast_jit(flax_model.apply)  # one compilation for both directions (op by op is slower)
        # PyTorch -> Flax.
        randomize_torch_(torch_model, seed)
        variables = torch_ref.export_flax_variables(torch_model, **convert)
        result = compare("logits torch->flax", "float64", apply(variables, xf), to_numpy(torch_model(xt)))
        assert result.passed, result
        # Flax -> PyTorch: the Flax model's own tree (from init), with random values.
        init = jax.eval_shape(flax_model.init, jax.random.key(seed), xf)
        flax_vars = randomize_flax({k: init[k] for k in init if k in ("params", "batch_stats")}, seed + 1)
        torch_ref.load_flax_variables(torch_model, flax_vars, **convert)
        result = compare("logits flax->torch", "float64", apply(flax_vars, xf), to_numpy(torch_model(xt)))
        assert result.passed, result
    assert_bit_exact(torch_ref.export_flax_variables(torch_model, **convert), flax_vars)


# ----------------------------------------------------------------- the seed's Net (both copies)


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


# -------------------------------------------------------------------------- model pairs


class ConvZooTorch(tnn.Module):
    """Strided, padded, grouped and dilated convolutions, tanh, average pooling, a square flatten."""

    def __init__(self):
        super().__init__()
        self.conv1 = tnn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.conv2 = tnn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, bias=False)
        self.pool = tnn.AvgPool2d(2)
        self.head = tnn.Linear(6 * 2 * 2, 5)

    def forward(self, x):  # (B, 4, 8, 8)
        x = torch.tanh(self.conv1(x))  # (B, 6, 4, 4)
        x = self.pool(torch.tanh(self.conv2(x)))  # (B, 6, 2, 2)
        return self.head(x.flatten(1))  # (B, 5)


class ConvZooFlax(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # (B, 8, 8, 4)
        x = jnp.tanh(fnn.Conv(6, (3, 3), strides=2, padding=1, feature_group_count=2, name="conv1")(x))
        x = fnn.Conv(6, (3, 3), padding=2, kernel_dilation=2, feature_group_count=3, use_bias=False,
                     name="conv2")(x)
        x = fnn.avg_pool(jnp.tanh(x), (2, 2), strides=(2, 2))  # (B, 2, 2, 6)
        return fnn.Dense(5, name="head")(x.reshape(x.shape[0], -1))


class BlockTorch(tnn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = tnn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class BatchNormTorch(tnn.Module):
    """Nested blocks with BatchNorm2d, global mean pooling, BatchNorm1d between two linears."""

    def __init__(self):
        super().__init__()
        self.block1 = BlockTorch(2, 4)
        self.block2 = BlockTorch(4, 4)
        self.head = tnn.Linear(4, 6)
        self.norm = tnn.BatchNorm1d(6)
        self.out = tnn.Linear(6, 3)

    def forward(self, x):  # (B, 2, 5, 5)
        x = self.block2(self.block1(x)).mean(dim=(2, 3))  # (B, 4)
        return self.out(torch.relu(self.norm(self.head(x))))  # (B, 3)


def flax_batch_norm(name: str) -> fnn.BatchNorm:
    # Eval mode: the running statistics, PyTorch's eps.
    return fnn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)


class BlockFlax(fnn.Module):
    features: int

    @fnn.compact
    def __call__(self, x):
        x = fnn.Conv(self.features, (3, 3), padding=1, use_bias=False, name="conv")(x)
        return fnn.relu(flax_batch_norm("bn")(x))


class BatchNormFlax(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # (B, 5, 5, 2)
        x = BlockFlax(4, name="block2")(BlockFlax(4, name="block1")(x)).mean(axis=(1, 2))  # (B, 4)
        x = fnn.relu(flax_batch_norm("norm")(fnn.Dense(6, name="head")(x)))
        return fnn.Dense(3, name="out")(x)  # (B, 3)


class WideTorch(tnn.Module):
    """A non-square (3, 4, 6) map flattened, through dropout, into a LayerNorm and a Linear."""

    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(2, 3, 3, padding=1)
        self.drop = tnn.Dropout(0.5)
        self.norm = tnn.LayerNorm(72)
        self.fc = tnn.Linear(72, 4)

    def forward(self, x):  # (B, 2, 4, 6)
        h = torch.relu(self.conv(x))  # (B, 3, 4, 6)
        h = h.view(h.size(0), -1)  # (B, 72), (c, h, w) order
        return self.fc(self.norm(self.drop(h)))


class WideFlax(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # (B, 4, 6, 2)
        h = fnn.relu(fnn.Conv(3, (3, 3), padding=1, name="conv")(x))  # (B, 4, 6, 3)
        h = h.reshape(h.shape[0], -1)  # (B, 72), (h, w, c) order
        return fnn.Dense(4, name="fc")(fnn.LayerNorm(epsilon=1e-5, name="norm")(h))


class TokensTorch(tnn.Module):
    """Embedding, LayerNorm, GroupNorm on token features."""

    def __init__(self):
        super().__init__()
        self.embed = tnn.Embedding(7, 6)
        self.norm = tnn.LayerNorm(6)
        self.mix = tnn.Linear(6, 6)
        self.group = tnn.GroupNorm(3, 6)
        self.head = tnn.Linear(6, 3)

    def forward(self, tokens):  # (B, T)
        h = torch.tanh(self.mix(self.norm(self.embed(tokens))))  # (B, T, 6)
        h = self.group(h.transpose(1, 2))  # (B, 6, T): GroupNorm takes channels first
        return self.head(h.mean(dim=-1))  # (B, 3)


class TokensFlax(fnn.Module):
    @fnn.compact
    def __call__(self, tokens):  # (B, T)
        h = fnn.LayerNorm(epsilon=1e-5, name="norm")(fnn.Embed(7, 6, name="embed")(tokens))
        h = jnp.tanh(fnn.Dense(6, name="mix")(h))  # (B, T, 6)
        h = fnn.GroupNorm(num_groups=3, epsilon=1e-5, name="group")(h)  # channels last
        return fnn.Dense(3, name="head")(h.mean(axis=1))


def sequential_torch() -> tnn.Sequential:
    return tnn.Sequential(tnn.Conv2d(1, 4, 3), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(4, 4, 3), tnn.ReLU(),
                          tnn.Flatten(), tnn.Linear(16, 3))


SEQUENTIAL_NAMES = {"0": "conv1", "3": "conv2", "6": "head"}


class SequentialFlax(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # (B, 10, 10, 1)
        x = fnn.max_pool(fnn.relu(fnn.Conv(4, (3, 3), padding="VALID", name="conv1")(x)), (2, 2), (2, 2))
        x = fnn.relu(fnn.Conv(4, (3, 3), padding="VALID", name="conv2")(x))  # (B, 2, 2, 4)
        return fnn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def images(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).normal(size=shape)


def test_strided_grouped_dilated_convolutions_with_average_pooling_agree():
    assert_twins(ConvZooTorch(), ConvZooFlax(), images(3, 4, 8, 8))


def test_nested_batchnorm_in_eval_mode_agrees_with_running_statistics():
    assert_twins(BatchNormTorch(), BatchNormFlax(), images(3, 2, 5, 5))


def test_non_square_flatten_into_layernorm_and_linear_agrees_given_example_input():
    x = images(3, 2, 4, 6)
    assert_twins(WideTorch(), WideFlax(), x, example_input=torch.from_numpy(x[:1]))  # any batch size


def test_embedding_layernorm_groupnorm_agree():
    tokens = np.random.default_rng(0).integers(0, 7, size=(3, 5))
    assert_twins(TokensTorch(), TokensFlax(), tokens)


def test_sequential_with_name_map_agrees():
    assert_twins(sequential_torch(), SequentialFlax(), images(2, 1, 10, 10), name_map=SEQUENTIAL_NAMES)


# ------------------------------------------------- 1-D and 3-D maps, transposed convolution, attention


class Conv1dTorch(tnn.Module):
    """A (4, 8) channels-first sequence map flattened into a Linear: its rows need the (l, c) order."""

    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv1d(2, 4, 3, padding=1, groups=2)
        self.head = tnn.Linear(4 * 8, 3)

    def forward(self, x):  # (B, 2, 8)
        return self.head(torch.tanh(self.conv(x)).flatten(1))  # (B, 4, 8) -> (B, 32) in (c, l) order


class Conv1dFlax(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # (B, 8, 2)
        x = jnp.tanh(fnn.Conv(4, (3,), padding=1, feature_group_count=2, name="conv")(x))  # (B, 8, 4)
        return fnn.Dense(3, name="head")(x.reshape(x.shape[0], -1))  # (l, c) order


class Conv3dTorch(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv3d(1, 2, 3, bias=False)
        self.norm = tnn.BatchNorm3d(2)
        self.head = tnn.Linear(2 * 2 * 2 * 2, 3)

    def forward(self, x):  # (B, 1, 4, 4, 4)
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))  # (B, 2, 2, 2, 2) -> (B, 16)


class Conv3dFlax(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # (B, 4, 4, 4, 1)
        x = fnn.Conv(2, (3, 3, 3), padding="VALID", use_bias=False, name="conv")(x)
        x = fnn.relu(flax_batch_norm("norm")(x))  # (B, 2, 2, 2, 2), channels last
        return fnn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


class UpTorch(tnn.Module):
    def __init__(self):
        super().__init__()
        self.up = tnn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
        self.head = tnn.Linear(3, 2)

    def forward(self, x):  # (B, 2, 4, 4)
        return self.head(torch.tanh(self.up(x)).mean(dim=(2, 3)))  # (B, 3, 8, 8) -> (B, 2)


class UpFlax(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # (B, 4, 4, 2)
        # PyTorch's padding p, output_padding q (kernel k) pad the dilated input by (k-1-p, k-1-p+q).
        x = fnn.ConvTranspose(3, (3, 3), strides=2, padding=((1, 2), (1, 2)), name="up")(x)  # (B, 8, 8, 3)
        return fnn.Dense(2, name="head")(jnp.tanh(x).mean(axis=(1, 2)))


class AttentionTorch(tnn.Module):
    def __init__(self):
        super().__init__()
        self.attn = tnn.MultiheadAttention(8, 2, batch_first=True)
        self.head = tnn.Linear(8, 3)

    def forward(self, x):  # (B, T, 8)
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out.mean(dim=1))


class AttentionFlax(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # (B, T, 8)
        out = fnn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=8, name="attn")(x, x)
        return fnn.Dense(3, name="head")(out.mean(axis=1))


def test_conv1d_flattened_into_a_linear_agrees_with_the_static_and_the_traced_order():
    x = images(3, 2, 8)
    assert_twins(Conv1dTorch(), Conv1dFlax(), x, channels_last=True)
    assert_twins(Conv1dTorch(), Conv1dFlax(), x, channels_last=True, example_input=torch.from_numpy(x[:1]))


def test_conv3d_with_batchnorm3d_flattened_into_a_linear_agrees():
    assert_twins(Conv3dTorch(), Conv3dFlax(), images(2, 1, 4, 4, 4), channels_last=True)


def test_transposed_convolution_agrees_with_flax_conv_transpose():
    assert_twins(UpTorch(), UpFlax(), images(2, 2, 4, 4))


def test_multihead_attention_agrees_with_multi_head_dot_product_attention():
    assert_twins(AttentionTorch(), AttentionFlax(), images(2, 5, 8))


def test_multihead_attention_with_other_key_and_value_sizes_agrees():
    torch_attn = tnn.MultiheadAttention(8, 4, kdim=5, vdim=6, batch_first=True).double().eval()
    randomize_torch_(torch_attn, 3)
    q, k, v = images(2, 3, 8), images(2, 4, 5), images(2, 4, 6)
    params = torch_ref.export_flax_params(torch_attn)
    assert params["key"]["kernel"].shape == (5, 4, 2) and params["out"]["kernel"].shape == (4, 2, 8)
    flax_attn = fnn.MultiHeadDotProductAttention(num_heads=4, qkv_features=8, out_features=8)
    with jax_dtype("float64"):
        out = flax_attn.apply({"params": params}, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    expected = to_numpy(torch_attn(*map(torch.from_numpy, (q, k, v)), need_weights=False)[0])
    result = compare("attention", "float64", out, expected)
    assert result.passed, result
    back = torch_ref.load_flax_params(tnn.MultiheadAttention(8, 4, kdim=5, vdim=6).double(), params)
    assert_bit_exact(torch_ref.export_flax_params(back), params)


# ----------------------------------------------------------------- names and flatten order


class Trunk(tnn.Module):
    def __init__(self):
        super().__init__()
        self.features = tnn.Sequential(tnn.Conv2d(1, 2, 3), tnn.ReLU(), tnn.Conv2d(2, 2, 3))
        self.features2 = tnn.Sequential(tnn.Conv2d(2, 2, 1))


def test_name_map_keys_are_path_prefixes_and_the_longest_match_wins():
    name_map = {"features": "backbone", "features.2": "last/conv", "features2": ""}
    params = torch_ref.export_flax_params(Trunk(), name_map=name_map)
    # "features" renames its subtree but not "features2" (whole path components); the exact path
    # "features.2" beats the prefix; "" maps "features2"'s subtree to the root.
    assert set(traverse_util.flatten_dict(params, sep="/")) == {
        "backbone/0/kernel", "backbone/0/bias", "last/conv/kernel", "last/conv/bias", "0/kernel", "0/bias",
    }


class PermutedFlatten(tnn.Module):
    def __init__(self, permute: bool):
        super().__init__()
        self.permute = permute
        self.conv = tnn.Conv2d(2, 3, 3, padding=1)
        self.fc = tnn.Linear(72, 4)

    def forward(self, x):  # (B, 2, 4, 6)
        h = self.conv(x)  # (B, 3, 4, 6)
        if self.permute:
            h = h.permute(0, 2, 3, 1).contiguous()  # (B, 4, 6, 3): flattened (h, w, c), as Flax does
        return self.fc(torch.flatten(h, 1))


@pytest.mark.parametrize("permute", [False, True])
def test_example_input_finds_the_flatten_order_of_a_non_square_map(permute):
    model = PermutedFlatten(permute)
    kernel = torch_ref.export_flax_params(model, example_input=torch.zeros(1, 2, 4, 6))["fc"]["kernel"]
    weight = to_numpy(model.fc.weight)
    expected = weight.T if permute else linear_kernel_to_flax(weight, (3, 4, 6))
    np.testing.assert_array_equal(kernel, expected)


def test_example_input_run_leaves_the_module_as_it_was():
    model = BatchNormTorch().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch_ref.export_flax_variables(model, example_input=torch.ones(4, 2, 5, 5))
    assert all(m.training for m in model.modules())  # restored after the eval-mode run
    for key, value in model.state_dict().items():  # train mode would have moved the running statistics
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------------- errors


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


def test_name_map_errors_name_the_key_or_the_clashing_tensors():
    with pytest.raises(ValueError, match=r"name_map key 'featurs' is not a module path of Trunk"):
        torch_ref.export_flax_params(Trunk(), name_map={"featurs": "backbone"})
    with pytest.raises(ValueError, match=r"features\.0\.weight and features\.2\.weight both map to "
                                         r"params\['conv'\]\['kernel'\]"):
        torch_ref.export_flax_params(Trunk(), name_map={"features.0": "conv", "features.2": "conv"})


def test_failing_example_input_says_so():
    with pytest.raises(ValueError, match=r"example_input: running WideTorch on it failed"):
        torch_ref.export_flax_params(WideTorch(), example_input=torch.zeros(1, 2, 5, 5))


def test_tied_weights_load_once_and_must_agree():
    model = holder(a=tnn.Linear(3, 3), b=tnn.Linear(3, 3))
    model.b.weight = model.a.weight
    params = torch_ref.export_flax_params(model)
    torch_ref.load_flax_params(model, params)
    params["b"]["kernel"] = params["b"]["kernel"] + 1.0
    with pytest.raises(ValueError, match=r"params\['a'\]\['kernel'\] and params\['b'\]\['kernel'\] load into "
                                         r"the same tensor a\.weight"):
        torch_ref.load_flax_params(model, params)
