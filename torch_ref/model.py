"""The seed answer's CNN in PyTorch, kept as close to the answer's code as possible."""

from __future__ import annotations

import torch
from torch import nn

from torch_ref.validation import check_net_input

#: Capture points of ``Net``, in forward order (same names as ``jax_impl``).
CAPTURE_NAMES = ("relu1", "relu2")


def conv_pool_output_size(size: int, kernel_size: int = 5) -> int:
    """Spatial size after a VALID conv (stride 1) and a 2x2/2 max-pool (floor)."""
    return (size - kernel_size + 1) // 2


class Net(nn.Module):
    """conv5x5(C->32) -> maxpool2 -> relu -> conv5x5(32->64) -> maxpool2 -> relu -> linear(->10).

    Input is NCHW ``(B, C, 32, 32)`` (JAX's ``Net`` takes NHWC). The forward
    pass is the seed answer's: it stores the activations ``self.relu1``
    (B, 32, 14, 14) and ``self.relu2`` (B, 64, 5, 5) so that
    ``torch.autograd.grad(loss, [model.relu1, model.relu2], create_graph=True)``
    can differentiate with respect to them. ``linear`` reads the flattened
    ``relu2`` in (c, h, w) order.

    ``in_channels`` (3 in the seed) and ``image_size`` (32) generalise the
    seed to other data; ``num_classes`` is 10.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5)
        self.pool = nn.MaxPool2d(2, 2)
        self.relu = nn.ReLU()
        side = conv_pool_output_size(conv_pool_output_size(image_size))
        if side < 1:
            raise ValueError(f"image_size must be at least 16 for two conv5x5+pool2 stages, got {image_size}")
        #: Shape (C, H, W) of ``relu2``, for input validation (the converter infers it on its own).
        self.feature_shape = (64, side, side)
        self.linear = nn.Linear(64 * side * side, num_classes)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_net_input(self, input)  # clear ValueError for a wrong shape/dtype (torch_ref.validation)
        conv1 = self.conv1(input)
        pool1 = self.pool(conv1)
        self.relu1 = self.relu(pool1)
        conv2 = self.conv2(self.relu1)
        pool2 = self.pool(conv2)
        self.relu2 = self.relu(pool2)
        # The answer uses .view; .reshape is the same here and also accepts channels-last inputs.
        relu2 = self.relu2.reshape(self.relu2.size(0), -1)
        return self.linear(relu2)

    def captures(self) -> dict[str, torch.Tensor]:
        """The activations stored by the last forward pass, by capture name."""
        return {name: getattr(self, name) for name in CAPTURE_NAMES}
