"""A CIFAR-style ResNet-18 in PyTorch, the twin of ``jax_impl.resnet.ResNet18``.

Same network and module names as the Flax twin (see its docstring):
``conv1``, ``bn1``, ``layer1`` ... ``layer4`` (``nn.Sequential`` of
``BasicBlock``s ``0``, ``1``, each with ``conv1``, ``bn1``, ``conv2``,
``bn2`` and, where the shape changes, ``shortcut_conv``, ``shortcut_bn``),
``linear``. ``torch_ref.export_flax_variables`` converts it to the Flax
twin's tree with no ``name_map``. Input NCHW. No activation is modified in
place, so any module output can be a capture point
(``capture_modules={"block": "layer1.0"}``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Blocks per stage of ResNet-18.
RESNET18_BLOCKS = (2, 2, 2, 2)


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``: (B, C, H, W) -> (B, planes, H/s, W/s)."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv(in_channels, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_conv = self.shortcut_bn = None
        if stride != 1 or in_channels != planes:
            self.shortcut_conv = _conv(in_channels, planes, 1, stride)
            self.shortcut_bn = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x))
        return F.relu(out + shortcut)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: NCHW (B, C, H, W) -> logits (B, num_classes)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64,
                 blocks: tuple[int, ...] = RESNET18_BLOCKS):
        super().__init__()
        self.conv1 = _conv(in_channels, width, 3, 1)
        self.bn1 = nn.BatchNorm2d(width)
        channels = width
        for i, count in enumerate(blocks):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            stage = []
            for j in range(count):
                stage.append(BasicBlock(channels, planes, stride if j == 0 else 1))
                channels = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(blocks)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"ResNet18 expects float images (B, C, H, W) (NCHW), got {x.dtype} "
                             f"{tuple(x.shape)}")
        x = F.relu(self.bn1(self.conv1(x)))  # (B, w, H, W)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = x.mean(dim=(2, 3))  # (B, 8w): global average pool
        return self.linear(x)  # (B, num_classes)
