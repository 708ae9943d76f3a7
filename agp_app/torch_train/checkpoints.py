"""The PyTorch trainer's checkpoints: WORKDIR/checkpoints/step_<step>.pt files, written atomically.

Each holds the model's and the optimizer's ``state_dict``, the step and the config record,
written with ``torch.save`` and read back with ``torch.load(weights_only=True)`` (tensors and plain
types only: a checkpoint never runs code).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agp_app.checkpoints import DIGEST_KEY, arrays_digest, check_digest, diverged, does_not_fit, unreadable
from agp_app.config import TrainConfig
from agp_app.errors import WriteFailed
from agp_app.io import CHECKPOINT_OVERHEAD, atomic_write, ensure_free_space, remove_stale_temporaries
from agp_app.runlog import check_saved_config

FRAMEWORK = "torch"
CHECKPOINT_PATTERN = re.compile(r"step_(\d+)\.pt")


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, oldest first (temporary files are ignored)."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.fullmatch(p.name)))


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:08d}.pt"


def save_checkpoint(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    record: dict[str, Any], keep: int) -> None:
    """Atomically write ``step_<step>.pt`` (model, optimizer, config, digest); keep only the newest ``keep``.

    Refuses (``NonFiniteError``) parameters with NaN/Inf: a checkpoint never holds a diverged state.
    """
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        steps = checkpoint_steps(folder)
        raise diverged(step, steps[-1] if steps else None)
    payload = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "config": record}
    payload[DIGEST_KEY] = payload_digest(payload)
    arrays = sum(t.nbytes for _, t in _named_tensors([payload["model"], payload["optimizer"]]))
    try:
        ensure_free_space(folder, arrays + CHECKPOINT_OVERHEAD)  # as the JAX trainer does before orbax
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(checkpoint_path(folder, step), lambda f: torch.save(payload, f), binary=True)
        for old in checkpoint_steps(folder)[:-keep]:
            checkpoint_path(folder, old).unlink(missing_ok=True)
    except OSError as e:  # disk full, quota, I/O: atomic_write has removed its temporary file
        raise WriteFailed("checkpoint", checkpoint_path(folder, step), e) from e


def _named_tensors(tree: Any, prefix: str = ""):
    """Every tensor in a nested state dict as ``(path, tensor)``, in the dict's order."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _named_tensors(value, f"{prefix}/{key}")
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from _named_tensors(value, f"{prefix}/{i}")


def payload_digest(payload: Mapping[str, Any]) -> str:
    """``arrays_digest`` of the model's and the optimizer's tensors and of the step in ``payload``."""
    tensors = _named_tensors({"model": payload["model"], "optimizer": payload["optimizer"]})
    arrays = ((name, t.detach().cpu().numpy()) for name, t in tensors)
    return arrays_digest(itertools.chain(arrays, [("step", np.asarray(payload["step"], np.int64))]))


def restore_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       config: TrainConfig, dataset_info: dict[str, Any] | None = None) -> int:
    """Load the newest checkpoint into ``model`` and ``optimizer`` (tensors only, no code); its step or 0.

    Temporary files of a save that was killed are removed first. ``UsageError`` (one line, exit 2)
    when the checkpoint is unreadable, truncated, from another config or data shape, does not fit, or
    its tensors do not match the digest saved with them (damaged on disk).
    """
    if folder.is_dir():
        remove_stale_temporaries(folder)
    steps = checkpoint_steps(folder)
    if not steps:
        return 0
    path = checkpoint_path(folder, steps[-1])
    where = f"checkpoint {path}"
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, foreign pickle, ...: never executed, always refused
        raise unreadable(where, e, steps) from None
    saved = payload.get("config") if isinstance(payload, dict) else None
    check_saved_config(saved, config, FRAMEWORK, str(path), dataset_info)
    try:
        check_digest(where, payload, payload_digest(payload), steps)  # never train on damaged arrays
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        step = int(payload["step"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise does_not_fit(where, e, steps) from None
    for group in optimizer.param_groups:  # the flag decides, not the stored state (resume checks it)
        group["lr"] = config.lr
    return step
