"""LeNet-5 in Flax Linen, the twin of ``examples/lenet_torch.py``, NHWC.

Same layer names as the PyTorch module (``conv1``, ``conv2``, ``fc1``,
``fc2``, ``fc3``), so ``torch_ref.export_flax_params`` maps the weights
without a ``name_map``. The capture points ``tanh1`` and ``tanh2`` are marked
with ``jax_impl.capture``; they are the PyTorch module's ``act1`` and
``act2`` outputs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_impl import capture


class LeNet(nn.Module):
    """(B, 28, 28, 1) -> (B, num_classes)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(6, (5, 5), padding=2, name="conv1")(x)  # (B, 28, 28, 6); PyTorch's padding=2
        x = capture(self, "tanh1", jnp.tanh(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # (B, 14, 14, 6)
        x = nn.Conv(16, (5, 5), padding="VALID", name="conv2")(x)  # (B, 10, 10, 16)
        x = capture(self, "tanh2", jnp.tanh(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # (B, 5, 5, 16)
        x = x.reshape(x.shape[0], -1)  # (B, 400), (h, w, c) order: the converter permutes fc1
        x = jnp.tanh(nn.Dense(120, name="fc1")(x))  # (B, 120)
        x = jnp.tanh(nn.Dense(84, name="fc2")(x))  # (B, 84)
        return nn.Dense(self.num_classes, name="fc3")(x)  # (B, num_classes)
