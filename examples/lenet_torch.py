"""LeNet-5 in plain PyTorch (LeCun et al. 1998, with tanh and average pooling), NCHW.

No project imports: this is "your model". Its capture points are the outputs
of the two ``nn.Tanh`` modules after the convolutions, named for forward hooks
by their module paths ``act1`` and ``act2``; the Flax twin is
``examples/lenet_flax.py``.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet(nn.Module):
    """(B, 1, 28, 28) -> (B, num_classes)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.act1 = nn.Tanh()
        self.pool1 = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.act2 = nn.Tanh()
        self.pool2 = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.conv1(x)))  # (B, 6, 14, 14)
        x = self.pool2(self.act2(self.conv2(x)))  # (B, 16, 5, 5)
        x = torch.flatten(x, 1)  # (B, 400), (c, h, w) order
        x = torch.tanh(self.fc1(x))  # (B, 120)
        x = torch.tanh(self.fc2(x))  # (B, 84)
        return self.fc3(x)  # (B, num_classes)
