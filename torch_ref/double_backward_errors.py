"""Second derivatives PyTorch does not implement: the error of the double backward, with its fix.

The exact penalty differentiates ``d loss / d a`` once more (``total.backward()``
after ``autograd.grad(..., create_graph=True)``). Some ops have no derivative of
their backward, most often the fused attention kernels; PyTorch then raises
"derivative for ... is not implemented" without saying what to do.
``second_derivative_hint`` turns that message into one that names the fix, and
``explain_missing_second_derivatives`` makes the double backward raise it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

#: A RuntimeError of a missing second derivative, and the fused attention kernels that raise it.
_NO_DERIVATIVE = re.compile(r"derivative for .* is not implemented")
_FUSED_ATTENTION = re.compile(r"scaled_dot_product|_efficient_attention|flash|cudnn_attention", re.IGNORECASE)


def second_derivative_hint(message: str) -> str | None:
    """The fix for a "derivative for ... is not implemented" error of the double backward, or None.

    Fused attention kernels (``F.scaled_dot_product_attention``'s flash,
    memory-efficient and cuDNN backends; Hugging Face's default
    ``attn_implementation="sdpa"``) have no second derivative; the exact
    penalty needs one, the finite-difference penalty does not.
    """
    if not _NO_DERIVATIVE.search(message):
        return None
    if _FUSED_ATTENTION.search(message):
        return ("the penalty's gradient needs the second derivative of fused scaled-dot-product attention, "
                "which PyTorch does not implement: load the model with attn_implementation=\"eager\" "
                "(Hugging Face) or avoid F.scaled_dot_product_attention, or pass "
                f"approx=\"finite_difference\" (first derivatives only) [{message}]")
    return ("the penalty's gradient needs a second derivative that PyTorch does not implement for an op of "
            "this model: pass approx=\"finite_difference\" (first derivatives only), or replace the op "
            f"[{message}]")


def explain_missing_second_derivatives(grads: Sequence[torch.Tensor]) -> None:
    """Make ``backward`` through the penalty name the fix where a second derivative is missing.

    ``autograd.grad(..., create_graph=True)`` succeeds even when an op's
    backward has no derivative itself; autograd puts a ``NotImplemented`` node
    in the graph, which raises only later, in ``total.backward()``. A pre-hook
    on each such node runs it and re-raises its error with
    ``second_derivative_hint`` (``raise ... from err``). The graph is walked
    once; its node types are read, nothing of PyTorch is changed.
    """
    stack = [g.grad_fn for g in grads if g.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "torch::autograd::NotImplemented":
            node.register_prehook(_reraise_with_hint(node))
        stack.extend(next_node for next_node, _ in node.next_functions)


def _reraise_with_hint(node):
    def prehook(grad_outputs):
        try:
            node(*grad_outputs)  # NotImplemented always raises: the error PyTorch would give
        except RuntimeError as err:
            hint = second_derivative_hint(str(err))
            if hint is None:
                raise
            raise RuntimeError(hint) from err

    return prehook
