"""The PyTorch side of the trainer skeleton (``agp_app.trainer``): ``TorchTrainer``, ``train_and_evaluate``.

Same flags, data, batch order and run folder as the JAX trainer (``agp_app``); differences:
checkpoints are ``.pt`` files (``checkpoints``); no multi-device data parallelism (one CPU or GPU
device); the last partial batch of an epoch is used as is (no padding needed). Never imports JAX.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agp_app import trainer as skeleton
from agp_app.batching import take_batch
from agp_app.checkpoints import CHECKPOINT_DIR
from agp_app.config import TrainConfig
from agp_app.data import Dataset
from agp_app.errors import UsageError
from agp_app.optim import optimizer_rule
from agp_app.torch_train.checkpoints import FRAMEWORK, restore_checkpoint, save_checkpoint
from agp_app.torch_train.evaluation import evaluate, evaluate_attacks, to_nchw
from agp_app.trainer import TrainResult
from torch_ref.convert import export_flax_params, load_flax_params
from torch_ref.hooks import NET_CAPTURE_MODULES
from torch_ref.model import CAPTURE_NAMES, Net
from torch_ref.penalty import train_step

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: ``agp_app.optim``'s rule kinds as ``torch.optim`` classes.
_TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """``sgd`` (the seed's), ``momentum`` (SGD, momentum 0.9) or ``adam``, with PyTorch's defaults.

    These are the update rules of ``optax.sgd(lr[, momentum])`` and ``optax.adam(lr)``
    (``agp_app.optim``): momentum buffer ``m = mu * m + g`` (no dampening), Adam with betas
    (0.9, 0.999), eps 1e-8 added outside the square root, bias-corrected.
    """
    rule = optimizer_rule(name)
    return _TORCH_OPTIMIZERS[rule.kind](params, lr=lr, **rule.kwargs)


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


class TorchTrainer:
    """``agp_app.trainer.Trainer`` for ``torch_ref.Net`` on PyTorch's default device."""

    framework = FRAMEWORK
    capture_names = CAPTURE_NAMES
    main_process = True
    fetch = None  # torch_ref.train_step returns floats
    fetch_every = 1

    def prepare(self, config: TrainConfig, ds: Dataset) -> None:
        self.config, self.ds, self.dtype = config, ds, np.dtype(config.dtype)
        self.options = config.penalty_options()
        # Shifting activations during forward needs hooks; Net's one ReLU module is called twice.
        self.hooks = NET_CAPTURE_MODULES if self.options.approx == "finite_difference" else None
        self.attacks = config.attacks()

    def init(self, params: Mapping | None) -> None:
        self.model = build_model(self.ds, self.config.seed, self.config.dtype, params)
        self.optimizer = make_optimizer(self.config.optimizer, self.model.parameters(), self.config.lr)
        self.steps_done = itertools.count(0)  # 0-based index of the step run_loop asks for next
        self.step_count = 0

    @contextlib.contextmanager
    def checkpoints(self, workdir: Path) -> Iterator[None]:
        self.folder = workdir / CHECKPOINT_DIR
        yield

    def restore(self, record: dict[str, Any]) -> int:
        start = restore_checkpoint(self.folder, self.model, self.optimizer, self.config, record["dataset"])
        self.steps_done, self.step_count = itertools.count(start), start
        return start

    def step(self, indices: np.ndarray) -> dict[str, float]:
        ds = self.ds
        xb, yb = take_batch(ds.x_train, ds.y_train, indices, self.dtype, ds.pixel_scale)
        self.step_count = next(self.steps_done)
        metrics = train_step(self.model, self.optimizer, to_nchw(xb), torch.from_numpy(yb).long(),
                             self.config.penalty_weight, options=self.options, step=self.step_count,
                             capture_modules=self.hooks)
        self.step_count += 1
        return metrics

    def evaluate(self) -> dict[str, float]:
        result = evaluate(self.model, self.ds, self.config.batch_size, self.dtype)
        if self.attacks:  # --eval-attacks: accuracy under attack beside the clean one
            result.update(evaluate_attacks(self.model, self.ds, self.config.batch_size, self.dtype,
                                           self.attacks))
        return result

    def save(self, step: int, record: dict[str, Any]) -> None:
        save_checkpoint(self.folder, step, self.model, self.optimizer, record, self.config.keep_checkpoints)

    def final(self) -> tuple[int, dict[str, dict[str, np.ndarray]]]:
        return self.step_count, export_flax_params(self.model)


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike | None = None, *,
                       params: Mapping | None = None, plots: bool = True,
                       handle_signals: bool = False) -> TrainResult:
    """Train as ``config`` says, in ``workdir`` (default ``config.workdir``), resuming if possible.

    ``params`` (a Flax-layout tree, e.g. ``jax_impl`` params as NumPy) replaces the seeded init.
    ``handle_signals``: SIGTERM/Ctrl-C save a checkpoint and raise ``Interrupted`` (the CLI).
    Nothing in ``workdir`` is written until the flags, the data, config.json and the newest
    checkpoint have all been checked.
    """
    return skeleton.train_and_evaluate(config, workdir, TorchTrainer(), params=params, plots=plots,
                                       handle_signals=handle_signals)
