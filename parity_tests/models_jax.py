"""Test models (not part of the ``jax_impl`` API): an MLP and a small residual CNN with BatchNorm.

The parity and option tests use them to check the penalty on architectures
other than the seed CNN. They show the one line any Linen model adds to get
the penalty::

    x = capture(self, "relu1", x)   # jax_impl.layers.capture: perturb + sow

and they mirror ``parity_tests.models_torch`` layer for layer (same names;
PyTorch-style initialisation is *not* needed: parity tests copy weights).
This module imports JAX only.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_impl.layers import capture

#: Capture points of ``MLP()`` (two hidden layers), in forward order.
MLP_CAPTURE_NAMES = ("relu1", "relu2")
#: Capture points of ``ResNet()``, in forward order (nested module names joined with "/").
RESNET_CAPTURE_NAMES = ("stem", "block1/relu")

#: PyTorch's BatchNorm defaults, in Flax's convention: Flax's running average is
#: ``momentum * old + (1 - momentum) * new``, PyTorch's ``(1 - m) * old + m * new``
#: with m = 0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class MLP(nn.Module):
    """flatten -> [dense -> relu -> capture "relu{k}"] per hidden layer -> dense(num_classes).

    Input (B, ...) is flattened in its own (NHWC) order: (B, D). Parameters
    ``dense1``, ``dense2``, ..., ``head``.
    """

    hidden: Sequence[int] = (64, 32)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)  # (B, D)
        for k, width in enumerate(self.hidden, start=1):
            x = nn.relu(nn.Dense(width, name=f"dense{k}")(x))  # (B, width)
            x = capture(self, f"relu{k}", x)
        return nn.Dense(self.num_classes, name="head")(x)  # (B, num_classes)


def conv3x3(features: int, name: str) -> nn.Conv:
    """3x3, stride 1, padding 1, no bias (PyTorch ``Conv2d(c, f, 3, padding=1, bias=False)``)."""
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name=name)


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """BatchNorm over (B, H, W) with PyTorch's defaults (see ``BN_MOMENTUM``).

    In train mode it normalises with the batch's biased variance and updates
    the ``batch_stats`` collection (Flax stores the *biased* variance in the
    running average; PyTorch stores the unbiased one).
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
        use_fast_variance=False, name=name,
    )


class ResidualBlock(nn.Module):
    """relu(x + bn2(conv2(relu(bn1(conv1(x)))))), captured as ``"relu"``: (B, H, W, F) -> same."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = nn.relu(batch_norm(train, "bn1")(conv3x3(self.features, "conv1")(x)))
        h = batch_norm(train, "bn2")(conv3x3(self.features, "conv2")(h))
        out = nn.relu(x + h)
        return capture(self, "relu", out)


class ResNet(nn.Module):
    """stem conv3x3 -> bn -> relu (capture "stem") -> residual block "block1" -> mean pool -> dense.

    Input NHWC (B, H, W, C); ``train`` selects batch statistics (and updates
    ``batch_stats``, pass ``mutable=["batch_stats"]``) or running averages.
    Capture points: ``stem`` and ``block1/relu``, both (B, H, W, width).
    """

    width: int = 8
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.relu(batch_norm(train, "stem_bn")(conv3x3(self.width, "stem_conv")(x)))  # (B, H, W, width)
        x = capture(self, "stem", x)
        x = ResidualBlock(self.width, name="block1")(x, train)  # (B, H, W, width)
        x = jnp.mean(x, axis=(1, 2))  # (B, width)
        return nn.Dense(self.num_classes, name="head")(x)  # (B, num_classes)
