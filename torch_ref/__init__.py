"""PyTorch reference of the activation gradient penalty, faithful to the seed answer.

This package never imports JAX; ``torch_ref.convert`` moves weights to and
from the Flax layout as plain NumPy arrays.
"""

from torch_ref.convert import export_flax_params, load_flax_params
from torch_ref.model import CAPTURE_NAMES, Net
from torch_ref.penalty import penalized_loss, question_step, train_step

__all__ = [
    "CAPTURE_NAMES",
    "Net",
    "export_flax_params",
    "load_flax_params",
    "penalized_loss",
    "question_step",
    "train_step",
]
