"""The seed's CNN in Flax Linen, with its two activation capture points."""

from __future__ import annotations

import flax.linen as nn
import jax

from jax_impl.conv_impl import ConvImpl, resolve_conv_impl
from jax_impl.layers import Conv2D, Dense, capture, max_pool_2x2
from jax_impl.validation import check_net_input

#: Capture points of ``Net``, in forward order.
CAPTURE_NAMES = ("relu1", "relu2")


class Net(nn.Module):
    """conv5x5(C->32) -> maxpool2 -> relu -> conv5x5(32->64) -> maxpool2 -> relu -> dense(->10).

    Input is NHWC ``(B, 32, 32, C)`` (PyTorch's ``Net`` takes NCHW); the
    number of channels ``C`` is taken from the data at ``init`` (3 in the seed).
    Parameters: ``conv1``, ``conv2`` (kernel HWIO, bias) and ``linear``
    (kernel (1600, 10), bias), initialised like PyTorch's defaults.

    Capture points (``sow`` + ``perturb``): ``relu1`` (B, 14, 14, 32) and
    ``relu2`` (B, 5, 5, 64). The flatten before ``linear`` is in NHWC order
    (h, w, c); PyTorch flattens (c, h, w), which the weight converter accounts
    for.

    ``conv_impl`` picks the convolution algorithm, a ``ConvImpl`` or its name,
    resolved once when the model is built (``jax_impl.conv_impl``): ``"auto"``
    (the fastest for the backend: oneDNN's kernels on CPU where they are
    built, else ``"canonical"``, and ``"xla"`` on GPU/TPU), ``"xla"``,
    ``"canonical"``, ``"im2col"`` or ``"onednn"``; see ``layers.Conv2D``. All
    give the same function; ``"canonical"`` and ``"onednn"`` have no
    forward-mode derivative, so use ``Net(conv_impl="xla")`` for ``jax.jvp`` /
    ``jax.hessian``.
    """

    num_classes: int = 10
    conv_impl: str | ConvImpl = "auto"

    def __post_init__(self):
        # The name becomes a ConvImpl here, outside any trace (loading oneDNN's library if it is built).
        object.__setattr__(self, "conv_impl", resolve_conv_impl(self.conv_impl))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_net_input(x, self.variables)  # clear ValueError for a wrong shape/dtype (static)
        x = Conv2D(32, 5, impl=self.conv_impl, name="conv1")(x)  # (B, 28, 28, 32)
        x = nn.relu(max_pool_2x2(x))  # (B, 14, 14, 32)
        x = capture(self, "relu1", x)
        x = Conv2D(64, 5, impl=self.conv_impl, name="conv2")(x)  # (B, 10, 10, 64)
        x = nn.relu(max_pool_2x2(x))  # (B, 5, 5, 64)
        x = capture(self, "relu2", x)
        x = x.reshape(x.shape[0], -1)  # (B, 1600), (h, w, c) order
        return Dense(self.num_classes, name="linear")(x)  # (B, 10)
