"""Explicit weight converters for the extra test architectures (``models_zoo``), PyTorch -> Flax.

Cross-framework by nature, so it lives in parity_tests/ (it only touches
NumPy on the Flax side). Every tensor has its layout rule written out and its
shape checked:

====================  ============================  ==============================
tensor                PyTorch                       Flax
====================  ============================  ==============================
linear weight         weight (out, in)              kernel (in, out)
first MLP layer       weight (out, C*H*W), c,h,w    kernel (H*W*C, out), h,w,c order
conv weight           weight (O, I, 3, 3)           kernel (3, 3, I, O)
BatchNorm affine      weight, bias (F,)             params scale, bias (F,)
BatchNorm running     running_mean, running_var     batch_stats mean, var (F,)
====================  ============================  ==============================

BatchNorm conventions differ in two places, which the tests compare
explicitly rather than hide here: PyTorch's ``momentum`` m updates
``(1 - m) * old + m * new`` where Flax's ``momentum`` is ``1 - m``; and
PyTorch's running variance averages the *unbiased* batch variance
(n / (n - 1) times the biased one used to normalise), Flax's the biased one.
"""

from __future__ import annotations

import numpy as np
import torch

from torch_ref.convert import conv_kernel_to_flax, linear_kernel_to_flax


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _checked(value: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    if value.shape != shape:
        raise ValueError(f"{what}: expected shape {shape}, got {value.shape}")
    return value


def _linear(layer: torch.nn.Linear, grads: bool) -> dict[str, np.ndarray]:
    w = layer.weight.grad if grads else layer.weight
    b = layer.bias.grad if grads else layer.bias
    out_f, in_f = w.shape
    return {"kernel": _checked(_np(w).T.copy(), (in_f, out_f), "linear kernel"), "bias": _np(b)}


def mlp_params_to_flax(net, input_chw: tuple[int, int, int], *, grads: bool = False) -> dict:
    """``torch_ref.MLP`` -> ``jax_impl.MLP`` params (or their ``.grad`` with ``grads=True``).

    The first layer reads the flattened image: PyTorch flattens NCHW (c, h, w),
    Flax NHWC (h, w, c), so its input axis is permuted, not just transposed.
    """
    out = {}
    for k in range(1, len(net.hidden) + 1):
        layer = getattr(net, f"dense{k}")
        out[f"dense{k}"] = _linear(layer, grads)
    first = net.dense1.weight.grad if grads else net.dense1.weight
    c, h, w = input_chw
    kernel = linear_kernel_to_flax(_np(first), (c, h, w))
    out["dense1"]["kernel"] = _checked(kernel, (h * w * c, first.shape[0]), "dense1 kernel")
    out["head"] = _linear(net.head, grads)
    return out


def _conv(conv: torch.nn.Conv2d, grads: bool) -> dict[str, np.ndarray]:
    w = conv.weight.grad if grads else conv.weight
    o, i, kh, kw = w.shape
    return {"kernel": _checked(conv_kernel_to_flax(_np(w)), (kh, kw, i, o), "conv kernel")}


def _bn_params(bn: torch.nn.BatchNorm2d, grads: bool) -> dict[str, np.ndarray]:
    w = bn.weight.grad if grads else bn.weight
    b = bn.bias.grad if grads else bn.bias
    return {"scale": _np(w), "bias": _np(b)}


def _bn_stats(bn: torch.nn.BatchNorm2d) -> dict[str, np.ndarray]:
    return {"mean": _np(bn.running_mean), "var": _np(bn.running_var)}


def resnet_to_flax(net, *, grads: bool = False) -> dict:
    """``torch_ref.ResNet`` -> ``{"params": ..., "batch_stats": ...}`` of ``jax_impl.ResNet``.

    With ``grads=True`` only ``params``-shaped ``.grad`` tensors are returned.
    ``batch_stats`` copies the running statistics as they are (both frameworks
    *use* them the same way in eval mode).
    """
    block = net.block1
    params = {
        "stem_conv": _conv(net.stem_conv, grads),
        "stem_bn": _bn_params(net.stem_bn, grads),
        "block1": {
            "conv1": _conv(block.conv1, grads),
            "bn1": _bn_params(block.bn1, grads),
            "conv2": _conv(block.conv2, grads),
            "bn2": _bn_params(block.bn2, grads),
        },
        "head": _linear(net.head, grads),
    }
    if grads:
        return params
    stats = {
        "stem_bn": _bn_stats(net.stem_bn),
        "block1": {"bn1": _bn_stats(block.bn1), "bn2": _bn_stats(block.bn2)},
    }
    return {"params": params, "batch_stats": stats}


def resnet_bn_modules(net) -> dict[str, torch.nn.BatchNorm2d]:
    """The ResNet's BatchNorm layers by their Flax ``batch_stats`` path ("block1/bn1")."""
    return {"stem_bn": net.stem_bn, "block1/bn1": net.block1.bn1, "block1/bn2": net.block1.bn2}
