"""PyTorch reference of the activation gradient penalty, faithful to the seed answer.

This package never imports JAX; ``torch_ref.convert`` moves weights to and
from the Flax layout as plain NumPy arrays.
"""

from agp_common.attack_spec import Attack
from agp_common.penalty_spec import PenaltyOptions
from torch_ref.attacks import adversarial_correct, adversarial_examples, fgsm, input_gradient, pgd
from torch_ref.capture import (
    NET_CAPTURE_MODULES,
    CaptureHooks,
    call_model,
    capture_points,
    forward_with_captures,
    forward_with_perturbations,
    output_logits,
)
from torch_ref.convert import (
    export_flax_params,
    export_flax_variables,
    load_flax_params,
    load_flax_variables,
    register_rule,
)
from torch_ref.model import CAPTURE_NAMES, Net
from torch_ref.penalty import (
    is_penalty_step,
    lazy_penalized_loss,
    lazy_penalty_weight,
    penalized_loss,
    question_step,
    stored_captures,
    train_step,
)

__all__ = [
    "CAPTURE_NAMES",
    "NET_CAPTURE_MODULES",
    "Attack",
    "CaptureHooks",
    "Net",
    "PenaltyOptions",
    "adversarial_correct",
    "adversarial_examples",
    "call_model",
    "capture_points",
    "export_flax_params",
    "export_flax_variables",
    "fgsm",
    "forward_with_captures",
    "forward_with_perturbations",
    "input_gradient",
    "is_penalty_step",
    "lazy_penalized_loss",
    "lazy_penalty_weight",
    "load_flax_params",
    "load_flax_variables",
    "output_logits",
    "penalized_loss",
    "pgd",
    "question_step",
    "register_rule",
    "stored_captures",
    "train_step",
]
