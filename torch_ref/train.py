"""``python -m torch_ref.train``: the same training job in PyTorch, for comparison with ``jax_impl.train``.

Same flags (``agp_common.config``), same data and seeded batch order
(``agp_common``), same run folder layout: config.json, metrics.jsonl (the
same keys), checkpoints, PNG plots, optional TensorBoard. Differences:

* checkpoints are ``checkpoints/step_<step>.pt`` files holding the model and
  optimizer ``state_dict`` and the config, written atomically with
  ``torch.save`` and read back with ``torch.load(weights_only=True)``;
* no multi-device data parallelism (one CPU or GPU device);
* the last partial batch of an epoch is used as is (no padding needed).

This module never imports JAX.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agp_common.attack_spec import Attack
from agp_common.batching import BatchOrder, eval_batches, take_batch
from agp_common.config import MOMENTUM, TrainConfig, parse_config, total_steps, validate_config
from agp_common.data import Dataset, load_dataset
from agp_common.errors import (
    REPORTED_ERRORS,
    NonFiniteError,
    UsageError,
    WriteFailed,
    report_error,
)
from agp_common.io import CHECKPOINT_OVERHEAD, atomic_write, ensure_free_space, remove_stale_temporaries
from agp_common.loop import run_loop
from agp_common.penalty_spec import INPUT
from agp_common.plot import plot_run
from agp_common.runlog import (
    check_config_file,
    check_saved_config,
    config_record,
    hold_workdir,
    prepare_workdir,
    summary_line,
    write_config,
)
from torch_ref.attacks import adversarial_correct
from torch_ref.convert import export_flax_params, load_flax_params
from torch_ref.hooks import NET_CAPTURE_MODULES
from torch_ref.model import CAPTURE_NAMES, Net
from torch_ref.penalty import train_step

FRAMEWORK = "torch"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"step_(\d+)\.pt")
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """``sgd`` (the seed's), ``momentum`` (SGD, momentum 0.9) or ``adam``, with PyTorch's defaults.

    These are the update rules of ``optax.sgd(lr[, momentum])`` and ``optax.adam(lr)``:
    momentum buffer ``m = mu * m + g`` (no dampening), Adam with betas
    (0.9, 0.999), eps 1e-8 added outside the square root, bias-corrected.
    """
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise UsageError(f"--optimizer must be one of sgd, momentum, adam; got {name!r}")


def to_nchw(x: np.ndarray) -> torch.Tensor:
    """NHWC images (B, H, W, C) -> NCHW tensor (B, C, H, W)."""
    # .copy() gives canonical NCHW strides, the layout PyTorch's CPU convolutions are fastest on.
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, batch_size: int, dtype) -> dict[str, float]:
    """``eval_loss`` (mean cross-entropy) and ``eval_accuracy`` over the whole test split."""
    loss_sum = correct = 0.0
    for idx in eval_batches(len(ds.y_test), batch_size):
        xb, yb = take_batch(ds.x_test, ds.y_test, idx, dtype, ds.pixel_scale)
        logits = model(to_nchw(xb))
        labels = torch.from_numpy(yb).long()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
    n = len(ds.y_test)
    return {"eval_loss": loss_sum / n, "eval_accuracy": correct / n}


def evaluate_attacks(model: nn.Module, ds: Dataset, batch_size: int, dtype,
                     attacks: Sequence[Attack]) -> dict[str, float]:
    """``{eval_accuracy/ATTACK@EPS: test accuracy}`` under each of ``attacks`` (``torch_ref.attacks``),
    clipped to the data's valid range ``ds.input_range()``."""
    counts, clip = dict.fromkeys((a.eval_key for a in attacks), 0), ds.input_range()
    for idx in eval_batches(len(ds.y_test), batch_size):
        xb, yb = take_batch(ds.x_test, ds.y_test, idx, dtype, ds.pixel_scale)
        right = adversarial_correct(model, to_nchw(xb), torch.from_numpy(yb).long(), attacks, clip=clip)
        for key, value in right.items():
            counts[key] += value
    return {key: value / len(ds.y_test) for key, value in counts.items()}


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, oldest first (temporary files are ignored)."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.fullmatch(p.name)))


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:08d}.pt"


def save_checkpoint(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    record: dict[str, Any], keep: int) -> None:
    """Atomically write ``step_<step>.pt`` (model, optimizer, config); keep only the newest ``keep``.

    Refuses (``NonFiniteError``) parameters with NaN/Inf: a checkpoint never holds a diverged state.
    """
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        steps = checkpoint_steps(folder)
        raise NonFiniteError(f"step {step}: the parameters are NaN/Inf after the update; not saved (the "
                             f"newest checkpoint, step {steps[-1] if steps else None}, is intact); try a "
                             "smaller --lr or --penalty-weight")
    payload = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "config": record}
    arrays = sum(t.nbytes for t in itertools.chain(payload["model"].values(), _tensors(payload["optimizer"])))
    try:
        ensure_free_space(folder, arrays + CHECKPOINT_OVERHEAD)  # as jax_impl.train does before orbax
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(checkpoint_path(folder, step), lambda f: torch.save(payload, f), binary=True)
        for old in checkpoint_steps(folder)[:-keep]:
            checkpoint_path(folder, old).unlink(missing_ok=True)
    except OSError as e:  # disk full, quota, I/O: atomic_write has removed its temporary file
        raise WriteFailed("checkpoint", checkpoint_path(folder, step), e) from e


def _tensors(tree: Any):
    """Every tensor in a nested state dict (the optimizer's)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _tensors(value)


def restore_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       config: TrainConfig, dataset_info: dict[str, Any] | None = None) -> int:
    """Load the newest checkpoint into ``model`` and ``optimizer`` (tensors only, no code); its step or 0.

    Temporary files of a save that was killed are removed first. ``UsageError`` (one line, exit 2)
    when the checkpoint is unreadable, truncated, from another config or data shape, or does not fit.
    """
    if folder.is_dir():
        remove_stale_temporaries(folder)
    steps = checkpoint_steps(folder)
    if not steps:
        return 0
    path = checkpoint_path(folder, steps[-1])
    advice = f"move it away to resume from the one before (steps saved: {steps}), or use another --workdir"
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, foreign pickle, ...: never executed, always refused
        lines = str(e).strip().splitlines()
        raise UsageError(f"checkpoint {path}: unreadable, corrupt or truncated ({type(e).__name__}: "
                         f"{lines[0] if lines else ''}); {advice}") from None
    saved = payload.get("config") if isinstance(payload, dict) else None
    check_saved_config(saved, config, FRAMEWORK, str(path), dataset_info)
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        step = int(payload["step"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        lines = str(e).strip().splitlines()
        raise UsageError(f"checkpoint {path}: does not fit this model ({type(e).__name__}: "
                         f"{lines[0] if lines else ''}); {advice}") from None
    return step


@dataclasses.dataclass
class TrainResult:
    """What a run ended with (``params`` as NumPy arrays in the Flax layout, for comparison)."""

    step: int
    params: dict[str, dict[str, np.ndarray]]
    last_train: dict[str, Any] | None
    final_eval: dict[str, float] | None
    wall_s: float
    summary: str


def build_model(ds: Dataset, seed: int, dtype: str, params: Mapping | None = None) -> Net:
    """``Net`` for the data's channels and image size, seeded init (or ``params`` in the Flax layout)."""
    h, w, c = ds.image_shape
    if h != w:
        raise UsageError(f"torch_ref.Net needs square images, got {h}x{w}")
    torch.manual_seed(seed)
    model = Net(in_channels=c, num_classes=ds.num_classes, image_size=h).to(TORCH_DTYPES[dtype])
    if params is not None:
        load_flax_params(model, params)
    return model


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike | None = None, *,
                       params: Mapping | None = None, plots: bool = True,
                       handle_signals: bool = False) -> TrainResult:
    """Train as ``config`` says, in ``workdir`` (default ``config.workdir``), resuming if possible.

    ``params`` (a Flax-layout tree, e.g. ``jax_impl`` params as NumPy) replaces the seeded init.
    ``handle_signals``: SIGTERM/Ctrl-C save a checkpoint and raise ``Interrupted`` (the CLI).
    Nothing in ``workdir`` is written until the flags, the data, config.json and the newest
    checkpoint have all been checked.
    """
    t_start = time.perf_counter()
    validate_config(config, (*CAPTURE_NAMES, INPUT))
    dtype = np.dtype(config.dtype)
    ds = load_dataset(config)
    if config.batch_size > len(ds.y_train):
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(ds.y_train)} "
                         "training examples")
    order = BatchOrder(config.seed, len(ds.y_train), config.batch_size)
    total = total_steps(config, order.steps_per_epoch)
    workdir = prepare_workdir(workdir or config.workdir)
    record = config_record(config, FRAMEWORK, ds.info())
    check_config_file(workdir, record)  # written only once the checkpoint is known to fit

    model = build_model(ds, config.seed, config.dtype, params)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr)
    folder = workdir / CHECKPOINT_DIR
    with hold_workdir(workdir):  # one run per workdir; released when the loop ends or fails
        start = restore_checkpoint(folder, model, optimizer, config, record["dataset"])
        if start > total:
            raise UsageError(f"{workdir} holds a run at step {start}, past the requested end at step "
                             f"{total}; ask for more --steps/--epochs or use another --workdir")
        write_config(workdir, record)

        steps_done = itertools.count(start)  # 0-based index of the step run_loop asks for next
        options = config.penalty_options()
        # Shifting activations during forward needs hooks; Net's one ReLU module is called twice.
        hooks = NET_CAPTURE_MODULES if options.approx == "finite_difference" else None

        def run_step(indices):
            xb, yb = take_batch(ds.x_train, ds.y_train, indices, dtype, ds.pixel_scale)
            return train_step(model, optimizer, to_nchw(xb), torch.from_numpy(yb).long(),
                              config.penalty_weight, options=options, step=next(steps_done),
                              capture_modules=hooks)

        attacks = config.attacks()

        def run_eval():
            result = evaluate(model, ds, config.batch_size, dtype)
            if attacks:  # --eval-attacks: accuracy under attack beside the clean one
                result.update(evaluate_attacks(model, ds, config.batch_size, dtype, attacks))
            return result

        def save(step):
            save_checkpoint(folder, step, model, optimizer, record, config.keep_checkpoints)

        loop = run_loop(config, workdir, order, start, total, train_step=run_step, evaluate=run_eval,
                        save=save, handle_signals=handle_signals)
    final_eval = loop.last_eval if loop.steps_run else run_eval()
    plot_paths = []
    if plots and (workdir / "metrics.jsonl").exists():
        plot_paths = plot_run(workdir)
    wall = time.perf_counter() - t_start
    return TrainResult(total, export_flax_params(model), loop.last_train, final_eval, wall,
                       summary_line(FRAMEWORK, total, wall, loop.last_train, final_eval, workdir, plot_paths))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: flags -> ``train_and_evaluate``.

    Usage and input errors: one line, exit 2; NaN/Inf in training: one line, exit 1;
    SIGTERM/Ctrl-C: checkpoint saved, one line, exit 143/130. ``--debug`` adds the traceback.
    """
    config = parse_config(argv, prog="python -m torch_ref.train", framework=FRAMEWORK)
    try:
        result = train_and_evaluate(config, handle_signals=True)
    except REPORTED_ERRORS as e:
        return report_error(e, config.debug)
    print(result.summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
