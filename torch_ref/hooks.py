"""Capture points by forward hooks: moved to ``torch_ref.capture``; this module re-exports them."""

from torch_ref.capture import (
    NET_CAPTURE_MODULES,
    CaptureHooks,
    forward_with_captures,
    forward_with_perturbations,
    parse_capture_spec,
)

__all__ = [
    "NET_CAPTURE_MODULES",
    "CaptureHooks",
    "forward_with_captures",
    "forward_with_perturbations",
    "parse_capture_spec",
]
