"""The PyTorch CLI's networks: the built-in ``--model`` names as ``nn.Module`` constructors.

``torch_registry(in_channels, num_classes, image_size)`` is the registry
``agp_app.model_spec.build_model`` takes::

    cnn       torch_ref.Net(in_channels, num_classes, image_size, **args)
    resnet18  torch_ref.resnet.ResNet18(in_channels, num_classes, **args)   (args: width, blocks)

Training and evaluation mode are ``model.train()`` / ``model.eval()``; BatchNorm's running
statistics are buffers (``state_dict``), the ``batch_stats`` of the Flax twin
(``torch_ref.export_flax_variables``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from torch_ref.model import Net
from torch_ref.resnet import ResNet18


def torch_registry(in_channels: int, num_classes: int,
                   image_size: int) -> dict[str, Callable[..., nn.Module]]:
    """Built-in ``--model`` names -> constructors taking ``--model-args`` as keywords."""
    sizes = {"in_channels": in_channels, "num_classes": num_classes}
    return {"cnn": functools.partial(Net, **sizes, image_size=image_size),
            "resnet18": functools.partial(ResNet18, **sizes)}
