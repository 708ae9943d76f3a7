"""Settings of the twins that no weight carries: normalisation epsilon and momentum, dropout.

A BatchNorm with ``eps=1e-5`` in PyTorch and Flax's default ``epsilon=1e-6``
converts bit-exactly and then fails every numeric row by ~1e-6 with no word of
why; a momentum mismatch (PyTorch's ``momentum=m`` is Flax's ``1 - m``) fails
nothing here and trains differently. The verifier reads both sides' settings
and states them as rows:

* ``normalization settings``: each PyTorch ``BatchNorm``/``LayerNorm``/``GroupNorm``
  against the Flax layer at the same path (``"."`` -> ``"/"``, ``layer.0`` or
  ``layer_0``): epsilon and momentum (BatchNorm); fails, naming the layers,
  when they differ. A BatchNorm in train mode on one side and eval mode on the
  other is an error (``check_batch_norm_modes``).
* ``dropout``: always disabled on both sides (PyTorch ``eval()`` outside the
  BatchNorm layers; Flax deterministic); a Flax ``Dropout`` left active is an error.

The Flax side is read during an abstract ``init`` (``record_flax_calls``,
``flax.linen.intercept_methods``): each normalisation or dropout layer's call
with its effective options (a module field or a call argument).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import flax.linen as linen
from torch import nn

from parity_tests.verifier.rows import Row

TORCH_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
TORCH_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout)


@dataclass(frozen=True)
class Layer:
    """One normalisation or dropout layer as called: its kind and effective options (Flax conventions).

    ``momentum`` is Flax's (the weight of the old running average: PyTorch's
    ``1 - momentum``); ``running`` whether BatchNorm normalises with its
    running statistics (eval mode); ``None`` where it does not apply.
    """

    kind: str  # "batch_norm", "layer_norm", "group_norm", "dropout"
    epsilon: float | None = None
    momentum: float | None = None
    running: bool | None = None
    rate: float | None = None
    deterministic: bool | None = None


@dataclass
class FlaxCalls:
    """What one (abstract) call of the Flax twin did: every submodule path called, in call order, and
    ``{path: Layer}`` of its normalisation and dropout layers (first call of each)."""

    paths: list[str] = field(default_factory=list)
    layers: dict[str, Layer] = field(default_factory=dict)


@contextlib.contextmanager
def record_flax_calls() -> Iterator[FlaxCalls]:
    """Record the Flax module calls in the block (``flax.linen.intercept_methods``)."""
    found = FlaxCalls()

    def recorder(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and module.scope is not None and module.path:
            path = "/".join(str(p) for p in module.path)
            if path not in found.layers:
                layer = _flax_layer(module, args, kwargs)
                if layer is not None:
                    found.layers[path] = layer
            if not found.paths or found.paths[-1] != path:
                found.paths.append(path)
        return next_fun(*args, **kwargs)

    with linen.intercept_methods(recorder):
        yield found


def _call_option(module: linen.Module, args, kwargs, name: str):
    """The effective value of an option given as a field or as a call argument (Flax's ``merge_param``)."""
    bound = inspect.signature(type(module).__call__).bind_partial(module, *args, **kwargs).arguments
    value = bound.get(name)
    return getattr(module, name, None) if value is None else value


def _flax_layer(module: linen.Module, args, kwargs) -> Layer | None:
    if isinstance(module, linen.BatchNorm):
        return Layer("batch_norm", module.epsilon, module.momentum,
                     running=bool(_call_option(module, args, kwargs, "use_running_average")))
    if isinstance(module, linen.LayerNorm):
        return Layer("layer_norm", module.epsilon)
    if isinstance(module, linen.GroupNorm):
        return Layer("group_norm", module.epsilon)
    if isinstance(module, linen.Dropout):
        return Layer("dropout", rate=module.rate,
                     deterministic=bool(_call_option(module, args, kwargs, "deterministic")))
    return None


def torch_layers(model: nn.Module, train: bool) -> dict[str, Layer]:
    """``{PyTorch path: Layer}`` of ``model``'s normalisation and dropout modules (Flax conventions)."""
    found = {}
    for path, m in model.named_modules():
        if isinstance(m, TORCH_BATCH_NORMS):
            momentum = None if m.momentum is None else 1.0 - m.momentum
            found[path] = Layer("batch_norm", m.eps, momentum, running=not train)
        elif isinstance(m, nn.LayerNorm):
            found[path] = Layer("layer_norm", m.eps)
        elif isinstance(m, nn.GroupNorm):
            found[path] = Layer("group_norm", m.eps)
        elif isinstance(m, TORCH_DROPOUTS):
            found[path] = Layer("dropout", rate=m.p, deterministic=True)
    return found


def set_torch_mode(model: nn.Module, train: bool) -> None:
    """Eval mode (dropout off) everywhere; BatchNorm layers in train mode when ``train``."""
    model.eval()
    if train:
        for m in model.modules():
            if isinstance(m, TORCH_BATCH_NORMS):
                m.train()


def flax_path(torch_path: str, name_map: Mapping[str, str] | None, flax_paths) -> str | None:
    """The Flax path of the PyTorch module at ``torch_path``, among ``flax_paths``, or ``None``.

    ``name_map`` prefixes first (``{"features.0": "conv1"}``), then ``"."`` -> ``"/"``. A
    numbered child ``layer.0`` may be spelled ``layer_0`` in Flax (a list of submodules assigned
    in ``setup``), or ``layer/layer_0`` (such a list inside a module of the same name, as in
    Hugging Face's Flax ResNet): Flax paths are compared with those spellings undone.
    """
    path = torch_path
    for prefix in sorted(name_map or {}, key=len, reverse=True):
        if path == prefix or path.startswith(prefix + "."):
            path = name_map[prefix].replace("/", ".") + path[len(prefix):]
            break
    wanted = path.replace(".", "/")
    if wanted in flax_paths:
        return wanted
    matches = [p for p in flax_paths if _unnumbered(p) == wanted]
    return matches[0] if len(matches) == 1 else None


def _unnumbered(flax_path: str) -> str:
    """``"a/layer/layer_0/bn"`` and ``"a/layer_0/bn"`` -> ``"a/layer/0/bn"``."""
    path = re.sub(r"(^|/)(\w+?)/\2_(\d+)(?=/|$)", r"\1\2/\3", flax_path)
    return re.sub(r"(^|/)(\w+?)_(\d+)(?=/|$)", r"\1\2/\3", path)


def check_batch_norm_modes(torch_found: Mapping[str, Layer], flax_found: Mapping[str, Layer],
                           name_map: Mapping[str, str] | None) -> None:
    """``ValueError`` for a Flax BatchNorm normalising with running averages where PyTorch's uses the
    batch's statistics, or the other way round (``train`` against the Flax module's own flag)."""
    for path, layer in torch_found.items():
        match = flax_path(path, name_map, flax_found) if layer.kind == "batch_norm" else None
        twin = flax_found.get(match)
        if twin is None or twin.kind != "batch_norm" or twin.running == layer.running:
            continue
        flax_mode = "running averages (eval mode)" if twin.running else "batch statistics (train mode)"
        raise ValueError(
            f"the Flax BatchNorm {match!r} normalises with {flax_mode} but PyTorch's {path!r} is in "
            f"{'eval' if layer.running else 'train'} mode (train={not layer.running}): make the Flax call "
            f"agree through flax_apply_kwargs (e.g. {{'train': {not layer.running}}}) or set train=")


def check_flax_dropout_off(flax_layers: Mapping[str, Layer]) -> None:
    """``ValueError`` for a Flax dropout left active: the verifier runs both sides without dropout."""
    active = [p for p, layer in flax_layers.items()
              if layer.kind == "dropout" and not layer.deterministic and layer.rate]
    if active:
        raise ValueError(
            f"the Flax twin's dropout is active at {active} (deterministic=False): the verifier compares "
            "with dropout off on both sides (PyTorch in eval mode); make the Flax call deterministic, e.g. "
            "flax_apply_kwargs={'deterministic': True} or {'train': False}")


def dropout_row(torch_found: Mapping[str, Layer], flax_found: Mapping[str, Layer]) -> Row:
    """A note: dropout is off on both sides, and how many dropout layers that concerns."""
    n_torch = sum(layer.kind == "dropout" for layer in torch_found.values())
    n_flax = sum(layer.kind == "dropout" for layer in flax_found.values())
    return Row.note("dropout", f"disabled on both sides: PyTorch eval() ({n_torch} Dropout modules), "
                               f"Flax deterministic ({n_flax} Dropout layers)")


def normalization_row(torch_found: Mapping[str, Layer], flax_found: Mapping[str, Layer],
                      name_map: Mapping[str, str] | None) -> Row | None:
    """Epsilon and momentum of each normalisation layer, PyTorch against Flax; ``None`` if there is none.

    Fails, naming each layer and both values, where the twins differ; layers
    found on one side only are listed (not compared).
    """
    norms = {p: layer for p, layer in torch_found.items() if layer.kind != "dropout"}
    if not norms:
        return None
    differences, unmatched = [], []
    for path, torch_layer in norms.items():
        match = flax_path(path, name_map, flax_found)
        if match is None or flax_found[match].kind != torch_layer.kind:
            unmatched.append(path)
            continue
        differences += _differences(path, torch_layer, flax_found[match])
    compared = len(norms) - len(unmatched)
    where = f"{compared} of {len(norms)} layers compared"
    if unmatched:
        where += f"; not found in the Flax twin: {unmatched[:4]}" + (" ..." if len(unmatched) > 4 else "")
    if differences:
        return Row.note("normalization settings", "; ".join(differences) + f" ({where})", passed=False)
    return Row.note("normalization settings", f"epsilon and momentum agree ({where})")


def _differences(path: str, t: Layer, f: Layer) -> list[str]:
    out = []
    if not math.isclose(t.epsilon, f.epsilon, rel_tol=1e-9):
        out.append(f"{path}: eps {t.epsilon:g} (PyTorch) != epsilon {f.epsilon:g} (Flax)")
    if t.kind == "batch_norm":
        if t.momentum is None:
            out.append(f"{path}: PyTorch momentum=None (cumulative average) has no Flax equivalent")
        elif not math.isclose(t.momentum, f.momentum, rel_tol=1e-9):
            out.append(f"{path}: momentum {1 - t.momentum:g} (PyTorch) is Flax momentum {t.momentum:g}, "
                       f"the Flax twin has {f.momentum:g}")
    return out
