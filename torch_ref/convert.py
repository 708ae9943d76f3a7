"""Weight conversion between ``torch_ref.Net`` and Flax parameter trees.

Cross-framework by nature, this module speaks NumPy on the Flax side (nested
dicts of arrays, the layout of ``jax_impl.Net``'s ``params``) so that it never
imports JAX. Layout rules, applied explicitly for every tensor:

=================  ========================  ==========================
parameter          PyTorch                   Flax
=================  ========================  ==========================
conv kernel        weight (O, I, kh, kw)     kernel (kh, kw, I, O)
conv bias          bias (O,)                 bias (O,)
linear kernel      weight (K, C*H*W)         kernel (H*W*C, K)
linear bias        bias (K,)                 bias (K,)
=================  ========================  ==========================

The linear kernel needs more than a transpose: PyTorch flattens ``relu2``
as (c, h, w) (NCHW) while Flax flattens (h, w, c) (NHWC), so its input axis
is permuted as well. Every conversion is a pure permutation of entries, hence
round trips are bit-exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

CONV_LAYERS = ("conv1", "conv2")
LINEAR_LAYER = "linear"
LAYER_NAMES = (*CONV_LAYERS, LINEAR_LAYER)
PARAM_NAMES = ("kernel", "bias")


def conv_kernel_to_flax(weight: np.ndarray) -> np.ndarray:
    """(O, I, kh, kw) -> (kh, kw, I, O)."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def conv_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """(kh, kw, I, O) -> (O, I, kh, kw)."""
    return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def linear_kernel_to_flax(weight: np.ndarray, feature_shape: tuple[int, int, int]) -> np.ndarray:
    """(K, C*H*W) in (c, h, w) order -> (H*W*C, K) in (h, w, c) order."""
    c, h, w = feature_shape
    k = weight.shape[0]
    return np.ascontiguousarray(weight.reshape(k, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, k))


def linear_kernel_to_torch(kernel: np.ndarray, feature_shape: tuple[int, int, int]) -> np.ndarray:
    """(H*W*C, K) in (h, w, c) order -> (K, C*H*W) in (c, h, w) order."""
    c, h, w = feature_shape
    k = kernel.shape[1]
    return np.ascontiguousarray(kernel.reshape(h, w, c, k).transpose(3, 2, 0, 1).reshape(k, c * h * w))


def _check_keys(found, expected, where: str) -> None:
    found, expected = set(found), set(expected)
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise ValueError(f"{where}: expected keys {sorted(expected)}; missing {missing}, unexpected {extra}")


def export_flax_params(torch_net: nn.Module, *, grads: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """``torch_ref.Net`` -> ``{"conv1": {"kernel", "bias"}, "conv2": ..., "linear": ...}`` (NumPy).

    The result can be passed as ``params`` to ``jax_impl.Net().apply``. Arrays
    keep the PyTorch dtype (float64 weights give float64 arrays). With
    ``grads=True`` the parameters' ``.grad`` tensors are exported instead, in
    the same layout, to compare with ``jax.grad`` of the Flax model.
    """

    def tensor(layer: str, attr: str) -> np.ndarray:
        param = getattr(getattr(torch_net, layer), attr)
        value = param.grad if grads else param
        if value is None:
            raise ValueError(f"{layer}.{attr} has no .grad; run backward() first")
        return value.detach().cpu().numpy()

    out: dict[str, dict[str, np.ndarray]] = {}
    for name in CONV_LAYERS:
        out[name] = {
            "kernel": conv_kernel_to_flax(tensor(name, "weight")),
            "bias": tensor(name, "bias").copy(),
        }
    out[LINEAR_LAYER] = {
        "kernel": linear_kernel_to_flax(tensor(LINEAR_LAYER, "weight"), torch_net.feature_shape),
        "bias": tensor(LINEAR_LAYER, "bias").copy(),
    }
    return out


def load_flax_params(torch_net: nn.Module, flax_params: Mapping) -> nn.Module:
    """Copy a Flax ``params`` tree (``jax_impl.Net`` layout) into ``torch_net``, in place.

    Checks that the tree has exactly the keys ``conv1``, ``conv2``, ``linear``
    each with ``kernel`` and ``bias``, and that every array has the Flax-layout
    shape of the PyTorch parameter it replaces (the error names both). Values are cast to the PyTorch
    parameters' dtype (like ``load_state_dict``); call ``torch_net.double()``
    first to keep float64 exactly. Returns ``torch_net``.
    """
    if "params" in flax_params and set(flax_params) <= {"params", "perturbations", "intermediates"}:
        raise ValueError("pass the 'params' collection (variables['params']), not the whole variables dict")
    _check_keys(flax_params.keys(), LAYER_NAMES, "flax params")
    state = dict(torch_net.named_parameters())
    torch_keys = [f"{n}.{p}" for n in LAYER_NAMES for p in ("weight", "bias")]
    _check_keys(state.keys(), torch_keys, "torch parameters")
    c, h, w = torch_net.feature_shape
    converted: dict[str, np.ndarray] = {}
    for name in LAYER_NAMES:
        _check_keys(flax_params[name].keys(), PARAM_NAMES, f"flax params[{name!r}]")
        weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
        # Shapes are checked in the Flax layout the caller passed, before any permutation.
        if name in CONV_LAYERS:
            o, i, kh, kw = weight.shape
            expected = {"kernel": (kh, kw, i, o), "bias": (o,)}
        else:
            expected = {"kernel": (c * h * w, weight.shape[0]), "bias": tuple(bias.shape)}
        arrays = {p: np.asarray(flax_params[name][p]) for p in PARAM_NAMES}
        for p in PARAM_NAMES:
            if arrays[p].shape != expected[p]:
                raise ValueError(
                    f"flax params[{name!r}][{p!r}]: expected shape {expected[p]}, got {arrays[p].shape}"
                )
        if name in CONV_LAYERS:
            converted[f"{name}.weight"] = conv_kernel_to_torch(arrays["kernel"])
        else:
            converted[f"{name}.weight"] = linear_kernel_to_torch(arrays["kernel"], torch_net.feature_shape)
        converted[f"{name}.bias"] = arrays["bias"]
    with torch.no_grad():
        for key, value in converted.items():
            state[key].copy_(torch.from_numpy(np.array(value)))
    return torch_net
