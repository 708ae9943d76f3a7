"""A CIFAR-style ResNet-18 in Flax Linen, the twin of ``torch_ref.resnet.ResNet18``.

The network of He et al. (2016) as it is trained on 32x32 images (a 3x3 stem,
no max-pool; the layout of the widely used CIFAR ResNets):

    conv3x3(C->w) -> BN -> relu                          (B, 32, 32, w)
    layer1: 2 BasicBlocks, w channels,   stride 1        (B, 32, 32, w)
    layer2: 2 BasicBlocks, 2w channels,  stride 2        (B, 16, 16, 2w)
    layer3: 2 BasicBlocks, 4w channels,  stride 2        (B, 8, 8, 4w)
    layer4: 2 BasicBlocks, 8w channels,  stride 2        (B, 4, 4, 8w)
    global average pool -> linear(8w -> num_classes)     (B, num_classes)

with ``w = width`` (64 in the paper). A BasicBlock is
``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a
1x1 strided convolution and BatchNorm where the shape changes
(``shortcut_conv``, ``shortcut_bn``), else the identity.

Module paths are those of the PyTorch twin with "." -> "/" (``layer2/0/conv1``
is ``layer2.0.conv1``), so ``torch_ref.export_flax_variables`` converts its
weights with no ``name_map``, and capture paths read the same in both
frameworks (``capture_modules={"block": "layer1/0"}``). BatchNorm is
PyTorch's (``BatchNorm`` below): ``momentum=0.9`` here is PyTorch's 0.1,
``epsilon`` 1e-5, and the running variance averages the *unbiased* batch
variance, so running statistics, and evaluation after training, match too.
``__call__(x, train=False)``: ``train=True`` normalises with the batch
statistics and updates ``batch_stats`` (apply with ``mutable=["batch_stats"]``).
Input NHWC (the PyTorch twin takes NCHW).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

#: PyTorch's BatchNorm defaults in Flax's convention (Flax keeps ``momentum`` of the old average).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
#: Blocks per stage of ResNet-18.
RESNET18_BLOCKS = (2, 2, 2, 2)


class BatchNorm(nn.Module):
    """PyTorch's ``BatchNorm2d`` over the last axis, with ``flax.linen.BatchNorm``'s variable names.

    Train mode (``use_running_average=False``) normalises with the batch mean
    ``mu`` and the *biased* variance ``s2`` over every axis but the last, and
    updates ``batch_stats``::

        mean <- momentum * mean + (1 - momentum) * mu
        var  <- momentum * var  + (1 - momentum) * s2 * n / (n - 1)      (n values per feature)

    ``flax.linen.BatchNorm`` averages ``s2`` itself, PyTorch the unbiased
    ``s2 * n / (n - 1)``: only the running statistics differ, hence only the
    outputs after training in eval mode. ``y = (x - mu) / sqrt(s2 + eps) * scale + bias``.
    Variables: ``params/{scale, bias}`` (features,), ``batch_stats/{mean, var}`` (features,).
    """

    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        if self.use_running_average:
            mean, var = running_mean.value.astype(x.dtype), running_var.value.astype(x.dtype)
        else:
            axes = tuple(range(x.ndim - 1))
            n = math.prod(x.shape[:-1])
            mean = jnp.mean(x, axis=axes)  # (features,)
            var = jnp.mean(jnp.square(x - mean), axis=axes)  # biased: what the batch is normalised with
            if not self.is_initializing():
                m = self.momentum
                unbiased = var * (n / max(n - 1, 1))
                running_mean.value = m * running_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
                running_var.value = m * running_var.value + (1 - m) * jax.lax.stop_gradient(unbiased)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(x.dtype) + bias.astype(x.dtype)


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    """PyTorch's ``Conv2d(k, stride, padding=k // 2, bias=False)``: explicit symmetric padding, no bias."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                   use_bias=False, name=name)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``: (B, H, W, C) -> (B, H/s, W/s, features)."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = functools.partial(BatchNorm, use_running_average=not train)
        out = nn.relu(norm(name="bn1")(_conv(self.features, 3, self.stride, "conv1")(x)))  # (B, H/s, W/s, F)
        out = norm(name="bn2")(_conv(self.features, 3, 1, "conv2")(out))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = norm(name="shortcut_bn")(_conv(self.features, 1, self.stride, "shortcut_conv")(x))
        return nn.relu(out + shortcut)


class Stage(nn.Module):
    """``blocks`` BasicBlocks named ``"0"``, ``"1"``, ...; the first one strides (as ``nn.Sequential``)."""

    features: int
    blocks: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.blocks):
            x = BasicBlock(self.features, self.stride if i == 0 else 1, name=str(i))(x, train)
        return x


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (module docstring): NHWC (B, H, W, C) -> logits (B, num_classes)."""

    num_classes: int = 10
    width: int = 64
    blocks: tuple[int, ...] = RESNET18_BLOCKS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"ResNet18 expects float images (B, H, W, C) (NHWC), got {x.dtype} {x.shape}")
        x = _conv(self.width, 3, 1, "conv1")(x)  # (B, H, W, w)
        x = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(x))
        for i, blocks in enumerate(self.blocks):
            x = Stage(self.width * 2**i, blocks, 1 if i == 0 else 2, name=f"layer{i + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # (B, 8w): global average pool
        return nn.Dense(self.num_classes, name="linear")(x)  # (B, num_classes)
