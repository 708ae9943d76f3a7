"""PyTorch models with hand-written Flax twins, and ``assert_twins``: the check that a pair agrees.

Helpers of the converter's tests (parity_tests/test_convert_*.py). Each model pair is a PyTorch
model and its Flax twin with the same layer names. ``assert_twins`` checks that they give the
same logits in both directions (PyTorch weights exported to Flax; Flax weights loaded into
PyTorch) and that a round trip gives back the very same bits. PyTorch flattens a (B, C, H, W)
map as (c, h, w) and Flax a (B, H, W, C) map as (h, w, c): a ``Linear`` (or a normalisation)
reading a flattened map needs its feature axis permuted, not just a transpose; the pairs
whose PyTorch side flattens a map fail the check if that permutation is dropped or misplaced.
The Flax forward passes are compiled with ``harness.fast_jit``: what is checked is where each
weight lands, which XLA's optimisation effort (rounding only) cannot change.
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util
from torch import nn as tnn

import torch_ref
from parity_tests.harness import compare, fast_jit, jax_dtype, to_numpy

# --------------------------------------------------------------------------- helpers


def assert_bit_exact(actual: dict, expected: dict) -> None:
    flat_a, flat_e = traverse_util.flatten_dict(actual), traverse_util.flatten_dict(expected)
    assert set(flat_a) == set(flat_e)
    for key, value in flat_e.items():
        assert np.asarray(flat_a[key]).dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(flat_a[key], value, err_msg=str(key))


def randomize_torch_(module: tnn.Module, seed: int, *, persistent_only: bool = False) -> None:
    """Every weight and running statistic random (variances positive): no default 0/1 hides a mistake.

    ``persistent_only``: the state dict's tensors only (non-persistent buffers, such as a model's
    position ids, untouched)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = (module.state_dict(keep_vars=True).items() if persistent_only
               else [*module.named_parameters(), *module.named_buffers()])
    with torch.no_grad():
        for name, t in tensors:
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


def images(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).normal(size=shape)


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
