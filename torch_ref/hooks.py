"""Capture points for any ``nn.Module`` through forward hooks, by name.

A capture spec maps a capture name to the submodule whose *output* is the
activation, by its ``named_modules()`` path, optionally with ``:k`` for the
k-th call of that module in one forward pass (for modules reused in
``forward``, like the seed ``Net``'s single ``self.relu``)::

    NET_CAPTURE_MODULES = {"relu1": "relu:0", "relu2": "relu:1"}

    with CaptureHooks(model, {"relu1": "act1"}) as hooks:
        logits = model(x)
    hooks.captured["relu1"]   # the output of model.act1, still in the graph

A spec that is not a submodule path may name an attribute that ``forward``
stores (``{"relu1": "relu1"}`` for the seed answer's ``Net``, which sets
``self.relu1``); it is read after the forward pass.

A hook can also add a tensor to the output (``shifts``), which the
finite-difference approximation needs. The captured tensor is the module's
output *after* the shift, exactly what the rest of the network consumes.
Modules that modify their input in place after the capture point
(``ReLU(inplace=True)`` right after it) would invalidate the capture.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

#: Capture spec of ``torch_ref.Net``: its one ``ReLU`` module is called twice.
NET_CAPTURE_MODULES = {"relu1": "relu:0", "relu2": "relu:1"}


def parse_capture_spec(spec: str) -> tuple[str, int]:
    """``"block.act"`` -> ("block.act", 0); ``"relu:1"`` -> ("relu", 1)."""
    path, sep, index = spec.partition(":")
    if not sep:
        return path, 0
    if not index.isdigit():
        raise ValueError(f"capture spec {spec!r}: expected 'module.path' or 'module.path:k' with k >= 0")
    return path, int(index)


class CaptureHooks:
    """Context manager that records (and optionally shifts) named module outputs during forward.

    Args:
      model: any ``nn.Module``.
      capture_modules: ``{capture name: "module.path" or "module.path:k"}``.
      shifts: optional ``{capture name: tensor}`` added to that output.

    After the forward pass, ``captured`` maps every capture name to its tensor;
    a name whose module was not called (often enough) raises on ``__exit__``
    through ``check_complete``.
    """

    def __init__(
        self,
        model: nn.Module,
        capture_modules: Mapping[str, str],
        shifts: Mapping[str, torch.Tensor] | None = None,
    ):
        modules = dict(model.named_modules())
        self._by_call: dict[tuple[str, int], str] = {}
        for name, spec in capture_modules.items():
            path, index = parse_capture_spec(spec)
            if path not in modules:
                known = [p for p in modules if p][:20]
                raise ValueError(f"capture {name!r}: no submodule {path!r}; submodules include {known}")
            self._by_call[(path, index)] = name
        self._modules = {path: modules[path] for path, _ in self._by_call}
        self._shifts = dict(shifts or {})
        self._names = tuple(capture_modules)
        self._handles: list = []
        self._calls: dict[str, int] = {}
        self.captured: dict[str, torch.Tensor] = {}

    def _hook(self, path: str):
        def hook(module, inputs, output):
            index = self._calls.get(path, 0)
            self._calls[path] = index + 1
            name = self._by_call.get((path, index))
            if name is None:
                return None
            if name in self._shifts:
                output = output + self._shifts[name]
            self.captured[name] = output
            return output

        return hook

    def __enter__(self) -> CaptureHooks:
        self._calls.clear()
        self.captured.clear()
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in self._modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def check_complete(self) -> dict[str, torch.Tensor]:
        """The captures in spec order; raises if a capture point was not reached."""
        missing = [n for n in self._names if n not in self.captured]
        if missing:
            raise ValueError(f"capture point(s) {missing} were not reached in forward (module not called)")
        return {n: self.captured[n] for n in self._names}


def forward_with_captures(
    model: nn.Module,
    input: torch.Tensor,
    capture_modules: Mapping[str, str],
    shifts: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``model(input)`` and ``{capture name: activation}`` by forward hooks.

    A spec that names no submodule (and has no ``:k``) is read instead as an
    attribute that ``forward`` stores (``self.relu1 = ...``, as in the seed
    answer's ``Net``), after the forward pass. Such a capture cannot be
    shifted (``shifts``): the finite-difference approximation needs a module.
    """
    modules = dict(model.named_modules())
    stored = {name: spec for name, spec in capture_modules.items() if ":" not in spec and spec not in modules}
    hooked = {name: spec for name, spec in capture_modules.items() if name not in stored}
    shifted_stored = sorted(set(shifts or {}) & set(stored))
    if shifted_stored:
        raise ValueError(f"capture point(s) {shifted_stored} are attributes stored by forward, which cannot "
                         "be shifted; name the module whose output they are "
                         "(capture_modules={name: 'module.path'})")
    with CaptureHooks(model, hooked, shifts) as hooks:
        output = model(input)
    captured = hooks.check_complete()
    for name, spec in stored.items():
        value = getattr(model, spec, None)
        if not isinstance(value, torch.Tensor):
            known = [p for p in modules if p][:20]
            raise ValueError(f"capture {name!r}: no submodule {spec!r} and forward stored no tensor "
                             f"self.{spec}; submodules include {known}")
        captured[name] = value
    return output, {name: captured[name] for name in capture_modules}
