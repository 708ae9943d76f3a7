"""PyTorch reference of the activation gradient penalty, faithful to the seed answer.

This package never imports JAX; ``torch_ref.convert`` moves weights to and
from the Flax layout as plain NumPy arrays.
"""

from agp_common.lazy import lazy_exports

#: Public name -> the module that defines it; imported on first use (``agp_common.lazy``), so that
#: ``import torch_ref`` is instant and JAX/PyTorch load when the first name is used.
_EXPORTS = {
    "Attack": "agp_common.attack_spec",
    "PenaltyOptions": "agp_common.penalty_spec",
    "adversarial_correct": "torch_ref.attacks",
    "adversarial_examples": "torch_ref.attacks",
    "fgsm": "torch_ref.attacks",
    "input_gradient": "torch_ref.attacks",
    "pgd": "torch_ref.attacks",
    "NET_CAPTURE_MODULES": "torch_ref.capture",
    "CaptureHooks": "torch_ref.capture",
    "call_model": "torch_ref.capture",
    "capture_points": "torch_ref.capture",
    "forward_with_captures": "torch_ref.capture",
    "forward_with_perturbations": "torch_ref.capture",
    "output_logits": "torch_ref.capture",
    "export_flax_params": "torch_ref.convert",
    "export_flax_variables": "torch_ref.convert",
    "load_flax_params": "torch_ref.convert",
    "load_flax_variables": "torch_ref.convert",
    "register_rule": "torch_ref.convert",
    "CAPTURE_NAMES": "torch_ref.model",
    "Net": "torch_ref.model",
    "is_penalty_step": "torch_ref.penalty",
    "lazy_penalized_loss": "torch_ref.penalty",
    "lazy_penalty_weight": "torch_ref.penalty",
    "penalized_loss": "torch_ref.penalty",
    "question_step": "torch_ref.penalty",
    "train_step": "torch_ref.penalty",
    "stored_captures": "torch_ref.penalty_forward",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
