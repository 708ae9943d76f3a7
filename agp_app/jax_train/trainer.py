"""The JAX side of the trainer skeleton (``agp_app.trainer``): ``JaxTrainer`` and ``train_and_evaluate``.

The state is ``TrainState(step, params, opt_state)``; ``train_step`` is pure and compiled once
(``compile.compiled_steps``) with the state donated, the batch sharded over a 1-D ``"data"`` mesh
of all devices and the state replicated; the learning rate and the penalty weight are traced
(``Hyperparams``), so runs with other values (a sweep) reuse the compilation.

The metrics stay on the device: the loop fetches them every ``METRICS_EVERY`` steps (and before
every evaluation and checkpoint), so the host does not wait for each step. A step whose loss,
penalty or gradient is not finite leaves the state unchanged; the fetch that sees it stops the
run naming that step, before anything is saved.

Every batch has the same shape: the last partial batch of an epoch is zero-padded and carries a
0/1 ``mask``, and the loss is ``sum_i m_i CE_i / sum_i m_i``, so loss, penalty and gradients are
exactly those of the real examples, and the step is never recompiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agp_app import trainer as skeleton
from agp_app.batching import padded_batch
from agp_app.config import TrainConfig
from agp_app.data import Dataset
from agp_app.jax_train.checkpoints import FRAMEWORK, checkpoint_manager, restore_checkpoint, save_checkpoint
from agp_app.jax_train.compile import compiled_attack_eval, compiled_steps
from agp_app.jax_train.evaluation import evaluate, evaluate_attacks
from agp_app.jax_train.mesh import check_batch_size, put_batch, replicated
from agp_app.jax_train.state import Params, create_train_state, hyperparams, init_params, make_optimizer
from agp_app.trainer import TrainResult
from jax_impl.model import CAPTURE_NAMES

#: Steps between two fetches of the metrics from the device (fewer host-device syncs; a NaN stops the
#: run at the next fetch at the latest, with the state of the step before it).
METRICS_EVERY = 20


class JaxTrainer:
    """``agp_app.trainer.Trainer`` for ``jax_impl.Net``, data-parallel over ``devices`` (default: all)."""

    framework = FRAMEWORK
    capture_names = CAPTURE_NAMES
    fetch = staticmethod(jax.device_get)
    fetch_every = METRICS_EVERY

    def __init__(self, devices: Sequence[jax.Device] | None = None):
        self.devices = tuple(jax.devices() if devices is None else devices)
        self.main_process = jax.process_index() == 0
        self.compilations = 0  # of the train step, counted from ``prepare`` on

    def prepare(self, config: TrainConfig, ds: Dataset) -> None:
        self.config, self.ds, self.dtype = config, ds, np.dtype(config.dtype)
        self.model, self.mesh, self.step_fn, self.eval_fn = compiled_steps(
            ds.num_classes, config.optimizer, self.devices, config.penalty_options(), config.conv_impl)
        self._traces_before = self.step_fn.traces
        attacks = config.attacks()
        self.attack_fn = (compiled_attack_eval(ds.num_classes, attacks, ds.input_range(),
                                               tuple(self.mesh.devices.flat), config.conv_impl)
                          if attacks else None)
        check_batch_size(config.batch_size, self.mesh, len(ds.y_train))

    def init(self, params: Params | None) -> None:
        config, dtype = self.config, self.dtype
        if params is None:
            params = init_params(self.model, self.ds.image_shape, config.seed, dtype)
        else:
            params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
        tx = make_optimizer(config.optimizer, config.lr)
        self.state = jax.device_put(create_train_state(params, tx), replicated(self.mesh))
        self.hparams = jax.device_put(hyperparams(config.lr, config.penalty_weight, dtype),
                                      replicated(self.mesh))

    @contextlib.contextmanager
    def checkpoints(self, workdir: Path) -> Iterator[None]:
        with checkpoint_manager(workdir, self.config.keep_checkpoints) as self.manager:
            yield

    def restore(self, record: dict[str, Any]) -> int:
        restored = restore_checkpoint(self.manager, self.state, self.config, record["dataset"])
        if restored is not None:
            self.state = restored
        return int(jax.device_get(self.state.step))

    def step(self, indices: np.ndarray) -> dict[str, jax.Array]:
        ds, config = self.ds, self.config
        batch = padded_batch(ds.x_train, ds.y_train, indices, config.batch_size, self.dtype, ds.pixel_scale)
        self.state, metrics = self.step_fn(self.state, put_batch(batch, self.mesh), self.hparams)
        return metrics  # on the device until the loop fetches it

    def evaluate(self) -> dict[str, float]:
        args = (self.state.params, self.ds, self.config.batch_size, self.dtype, self.mesh)
        result = evaluate(self.eval_fn, *args)
        if self.attack_fn is not None:  # --eval-attacks: accuracy under attack beside the clean one
            result.update(evaluate_attacks(self.attack_fn, *args))
        return result

    def save(self, step: int, record: dict[str, Any]) -> None:
        save_checkpoint(self.manager, self.state, record)

    def final(self) -> tuple[int, Params]:
        self.compilations = self.step_fn.traces - self._traces_before
        return int(jax.device_get(self.state.step)), jax.device_get(self.state.params)


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike | None = None, *,
                       params: Params | None = None, devices: Sequence[jax.Device] | None = None,
                       plots: bool = True, handle_signals: bool = False) -> TrainResult:
    """Train as ``config`` says, in ``workdir`` (default ``config.workdir``), resuming if possible.

    ``params`` (a Flax ``params`` tree, e.g. from ``torch_ref.export_flax_params``)
    replaces the seeded initialisation; ``devices`` restricts the data mesh
    (default: all). Float64 (``config.dtype``) runs inside ``jax.enable_x64``.
    ``handle_signals``: SIGTERM/Ctrl-C save a checkpoint and raise ``Interrupted`` (the CLI).
    The result's ``train_step_compilations`` counts the train step's compilations during the run.

    Nothing in ``workdir`` is written until the flags, the data, config.json
    and the newest checkpoint have all been checked.
    """
    trainer = JaxTrainer(devices)
    with jax.enable_x64(config.dtype == "float64"):
        result = skeleton.train_and_evaluate(config, workdir, trainer, params=params, plots=plots,
                                             handle_signals=handle_signals)
    return dataclasses.replace(result, train_step_compilations=trainer.compilations)
