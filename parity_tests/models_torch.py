"""Test models (not part of the ``torch_ref`` API): PyTorch twins of ``parity_tests.models_jax``.

An MLP and a small residual CNN with BatchNorm, used by the parity and hook
tests. Plain ``nn.Module``s with no capture code at all: their capture points
are given by name to ``torch_ref.penalized_loss(..., capture_modules=...)``
(forward hooks, ``torch_ref.hooks``). Layer names match the Flax models.
Inputs are NCHW. This module imports PyTorch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: ``{capture name: module path}`` of ``MLP()`` (two hidden layers).
MLP_CAPTURE_MODULES = {"relu1": "act1", "relu2": "act2"}
#: ``{capture name: module path}`` of ``ResNet()``; names match ``parity_tests.models_jax``.
RESNET_CAPTURE_MODULES = {"stem": "stem_act", "block1/relu": "block1.act_out"}


class MLP(nn.Module):
    """flatten (c, h, w order) -> [linear -> relu] per hidden layer -> linear."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (64, 32), num_classes: int = 10):
        super().__init__()
        self.hidden = tuple(hidden)
        width = in_features
        for k, h in enumerate(self.hidden, start=1):
            setattr(self, f"dense{k}", nn.Linear(width, h))
            setattr(self, f"act{k}", nn.ReLU())
            width = h
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, C*H*W)
        for k in range(1, len(self.hidden) + 1):
            x = getattr(self, f"act{k}")(getattr(self, f"dense{k}")(x))
        return self.head(x)


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class ResidualBlock(nn.Module):
    """relu(x + bn2(conv2(relu(bn1(conv1(x)))))); ``act_out`` is the capture point."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = conv3x3(features, features)
        self.bn1 = nn.BatchNorm2d(features)  # momentum 0.1 == Flax momentum 0.9
        self.act1 = nn.ReLU()
        self.conv2 = conv3x3(features, features)
        self.bn2 = nn.BatchNorm2d(features)
        self.act_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.act_out(x + h)


class ResNet(nn.Module):
    """stem conv3x3 -> bn -> relu -> residual block -> mean over (H, W) -> linear.

    ``model.train()`` uses batch statistics (and updates running stats with
    the *unbiased* variance; Flax stores the biased one), ``model.eval()`` the
    running ones.
    """

    def __init__(self, in_channels: int = 1, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem_conv = conv3x3(in_channels, width)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stem_act = nn.ReLU()
        self.block1 = ResidualBlock(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem_bn(self.stem_conv(x)))  # (B, width, H, W)
        x = self.block1(x)
        return self.head(x.mean(dim=(2, 3)))  # (B, num_classes)
