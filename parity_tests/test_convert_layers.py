"""The converter on each layer type: a PyTorch model and its Flax twin agree in both directions.

Every pair (``parity_tests.convert_twins``) gives the same float64 logits with PyTorch's weights
exported to Flax and with Flax's weights loaded into PyTorch, and a Flax -> PyTorch -> Flax round
trip is bit-exact: convolutions (strided, grouped, dilated, 1-D, 3-D, transposed), BatchNorm in
eval mode, LayerNorm, GroupNorm, Embedding, Sequential with a name map, multi-head attention, and
flattened maps read by a Linear or a normalisation.
"""

from __future__ import annotations

import flax.linen as fnn
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn as tnn

import torch_ref
from parity_tests.convert_twins import (
    SEQUENTIAL_NAMES,
    AttentionFlax,
    AttentionTorch,
    BatchNormFlax,
    BatchNormTorch,
    Conv1dFlax,
    Conv1dTorch,
    Conv3dFlax,
    Conv3dTorch,
    ConvZooFlax,
    ConvZooTorch,
    SequentialFlax,
    TokensFlax,
    TokensTorch,
    UpFlax,
    UpTorch,
    WideFlax,
    WideTorch,
    assert_bit_exact,
    assert_twins,
    images,
    randomize_torch_,
    sequential_torch,
)
from parity_tests.harness import compare, jax_dtype, to_numpy


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
