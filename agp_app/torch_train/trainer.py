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
from agp_app.augment import augment_batch
from agp_app.batching import take_batch
from agp_app.checkpoints import CHECKPOINT_DIR
from agp_app.config import TrainConfig
from agp_app.data import Dataset
from agp_app.errors import UsageError
from agp_app.model_spec import DEFAULT_MODEL, ModelSpec
from agp_app.model_spec import build_model as build_spec
from agp_app.shared_init import draw_shared_variables
from agp_app.torch_models import torch_registry
from agp_app.torch_recipe import named_optimizer as make_optimizer
from agp_app.torch_recipe import set_learning_rate
from agp_app.torch_train.checkpoints import FRAMEWORK, restore_checkpoint, save_checkpoint
from agp_app.torch_train.evaluation import evaluate, evaluate_attacks, to_nchw
from agp_app.trainer import TrainResult, resolve_penalty_layers, scheduled_lr, unknown_layers
from torch_ref.capture import capture_points
from torch_ref.convert import export_flax_params, export_flax_variables, load_flax_params, load_flax_variables
from torch_ref.hooks import NET_CAPTURE_MODULES
from torch_ref.model import CAPTURE_NAMES
from torch_ref.penalty import train_step

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_model(ds: Dataset, seed: int, dtype: str, params: Mapping | None = None, *,
                spec: ModelSpec = DEFAULT_MODEL, init: str = "seeded") -> torch.nn.Module:
    """The ``--model`` network for the data's channels, classes and image size, in ``dtype``.

    Weights: PyTorch's seeded init (``torch.manual_seed(seed)``), the framework-free draw of
    ``agp_app.shared_init`` (``init="shared"``, the weights the JAX CLI draws), or ``params`` (a
    Flax-layout tree) when given.
    """
    h, w, c = ds.image_shape
    if h != w and spec.name == "cnn":
        raise UsageError(f"torch_ref.Net needs square images, got {h}x{w}")
    torch.manual_seed(seed)
    try:
        model = build_spec(spec, torch_registry(c, ds.num_classes, h), torch.nn.Module, "PyTorch",
                           data_kwargs={"in_channels": c, "num_classes": ds.num_classes, "image_size": h})
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    model = model.to(TORCH_DTYPES[dtype])
    example = torch.zeros((1, c, h, w), dtype=TORCH_DTYPES[dtype])
    if init == "shared":
        shapes = export_flax_variables(model, example_input=example)
        load_flax_variables(model, draw_shared_variables(shapes, seed), example_input=example)
    if params is not None:
        load_flax_params(model, params, example_input=example)
    return model


class TorchTrainer:
    """``agp_app.trainer.Trainer`` for the ``--model`` network on PyTorch's default device."""

    framework = FRAMEWORK
    capture_names: tuple[str, ...] = ()
    capture_modules: dict[str, str] = {}  # noqa: RUF012 (replaced, never mutated)
    total_steps = 0
    main_process = True
    fetch = None  # torch_ref.train_step returns floats
    fetch_every = 1

    def prepare(self, config: TrainConfig, ds: Dataset) -> None:
        self.config, self.ds, self.dtype = config, ds, np.dtype(config.storage_dtype())
        self.options = config.penalty_options()
        self.spec = config.model_spec()
        probe = build_model(ds, config.seed, "float32", spec=self.spec)  # its capture points and paths
        h, w, c = ds.image_shape
        self.capture_names = CAPTURE_NAMES if self.spec.name == "cnn" else tuple(
            probe.captures()) if hasattr(probe, "captures") else ()
        self.capture_modules = resolve_penalty_layers(config, self.capture_names)
        if self.capture_modules:
            called = capture_points(probe, torch.zeros((1, c, h, w)))
            missing = [path for path in self.capture_modules.values() if path.replace("/", ".") not in called]
            if missing:
                raise UsageError(unknown_layers(missing, self.capture_names,
                                                f"module paths it calls: {', '.join(list(called)[:12])} ... "
                                                "(torch_ref.capture_points lists them all)"))
        hooks = {name: path.replace("/", ".") for name, path in self.capture_modules.items()}
        if self.spec.name == "cnn" and (hooks or self.options.approx == "finite_difference"):
            # Shifting activations during forward needs hooks; Net's one ReLU module is called twice.
            hooks = {**NET_CAPTURE_MODULES, **hooks}
        self.hooks = hooks or None
        self.attacks = config.attacks()
        self.autocast = config.dtype == "bfloat16"

    def init(self, params: Mapping | None) -> None:
        config = self.config
        self.model = build_model(self.ds, config.seed, config.storage_dtype(), params, spec=self.spec,
                                 init=config.init)
        self.optimizer = make_optimizer(config.optimizer, self.model.parameters(), config.lr,
                                        weight_decay=config.weight_decay,
                                        decoupled=config.weight_decay_form == "decoupled")
        self.lr_at = scheduled_lr(config, self.total_steps)
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
        ds, config = self.ds, self.config
        xb, yb = take_batch(ds.x_train, ds.y_train, indices, self.dtype, ds.pixel_scale)
        self.step_count = t = next(self.steps_done)
        if config.augment:  # drawn from (seed, step) as in the JAX CLI: same images, resumable
            xb = augment_batch(xb, seed=config.seed, step=t, ops=config.augment)
        lr = self.lr_at(t)
        set_learning_rate(self.optimizer, lr)
        self.model.train()  # BatchNorm: batch statistics, running averages updated
        # bfloat16: float32 weights and optimizer state, the forward and both backward passes in bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            metrics = train_step(self.model, self.optimizer, to_nchw(xb), torch.from_numpy(yb).long(),
                                 config.penalty_weight, options=self.options, step=t,
                                 capture_modules=self.hooks)
        self.step_count += 1
        return {**metrics, "lr": lr}

    def evaluate(self) -> dict[str, float]:
        self.model.eval()  # BatchNorm: running statistics
        result = evaluate(self.model, self.ds, self.config.batch_size, self.dtype)
        if self.attacks:  # --eval-attacks: accuracy under attack beside the clean one
            result.update(evaluate_attacks(self.model, self.ds, self.config.batch_size, self.dtype,
                                           self.attacks))
        return result

    def save(self, step: int, record: dict[str, Any]) -> None:
        save_checkpoint(self.folder, step, self.model, self.optimizer, record, self.config.keep_checkpoints)

    def final(self) -> tuple[int, dict[str, dict[str, np.ndarray]]]:
        h, w, c = self.ds.image_shape
        example = torch.zeros((1, c, h, w), dtype=next(self.model.parameters()).dtype)
        return self.step_count, export_flax_params(self.model, example_input=example)


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
