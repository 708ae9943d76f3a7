"""PyTorch reference of the activation gradient penalty, faithful to the seed answer.

This package never imports JAX; ``torch_ref.convert`` moves weights to and
from the Flax layout as plain NumPy arrays.
"""

from torch_ref.convert import export_flax_params, load_flax_params
from torch_ref.hooks import NET_CAPTURE_MODULES, CaptureHooks, forward_with_captures
from torch_ref.model import CAPTURE_NAMES, Net
from torch_ref.models_zoo import MLP, MLP_CAPTURE_MODULES, RESNET_CAPTURE_MODULES, ResNet
from torch_ref.penalty import (
    is_penalty_step,
    lazy_penalized_loss,
    lazy_penalty_weight,
    penalized_loss,
    question_step,
    train_step,
)

__all__ = [
    "CAPTURE_NAMES",
    "MLP",
    "MLP_CAPTURE_MODULES",
    "NET_CAPTURE_MODULES",
    "RESNET_CAPTURE_MODULES",
    "CaptureHooks",
    "Net",
    "ResNet",
    "export_flax_params",
    "forward_with_captures",
    "is_penalty_step",
    "lazy_penalized_loss",
    "lazy_penalty_weight",
    "load_flax_params",
    "penalized_loss",
    "question_step",
    "train_step",
]
