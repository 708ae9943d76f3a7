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

``--steps-per-dispatch N`` (``dispatch``): with the data on the devices, ``steps`` runs N steps in
one compiled call (``compile.compiled_train_chunk``) and returns each step's metrics (``dispatch.
ChunkStep``), which ``fetch`` (``dispatch.fetch_metrics``) splits per step.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agp_app import trainer as skeleton
from agp_app.config import TrainConfig
from agp_app.data import Dataset
from agp_app.errors import UsageError
from agp_app.jax_models import capture_names
from agp_app.jax_train.checkpoints import FRAMEWORK, checkpoint_manager, restore_checkpoint, save_checkpoint
from agp_app.jax_train.compile import compiled_attack_eval, compiled_steps, compiled_train_chunk
from agp_app.jax_train.dispatch import ChunkStep, fetch_metrics, resolve_steps_per_dispatch
from agp_app.jax_train.evaluation import evaluate, evaluate_attacks
from agp_app.jax_train.feeding import augment_transform, make_feeder, padded_indices
from agp_app.jax_train.mesh import check_batch_size, replicated
from agp_app.jax_train.state import (
    Params,
    create_train_state,
    hyperparams,
    init_model_state,
    init_variables,
    make_optimizer,
)
from agp_app.jax_train.steps import variables_of
from agp_app.trainer import TrainResult, resolve_penalty_layers, scheduled_lr, unknown_layers

#: What the train step was first called with in this process (``first_call``).
_CALLED: set[tuple[Any, ...]] = set()


def first_call(fn: Any, *key: Any) -> bool:
    """True the first time in this process for ``(fn, *key)``: a compiled function's first call on new
    shapes, which compiles it (the jit cache is keyed on the shapes and dtypes)."""
    if (fn, *key) in _CALLED:
        return False
    _CALLED.add((fn, *key))
    return True


#: Steps between two fetches of the metrics from the device (fewer host-device syncs; a NaN stops the
#: run at the next fetch at the latest, with the state of the step before it).
METRICS_EVERY = 20


class JaxTrainer:
    """``agp_app.trainer.Trainer`` for the ``--model`` Flax module, data-parallel over ``devices``
    (default: all)."""

    framework = FRAMEWORK
    capture_names: tuple[str, ...] = ()
    capture_modules: dict[str, str] = {}  # noqa: RUF012 (replaced, never mutated)
    fetch = staticmethod(fetch_metrics)
    fetch_every = METRICS_EVERY
    steps_per_dispatch = 1  # set by ``prepare`` (``dispatch.resolve_steps_per_dispatch``)

    def __init__(self, devices: Sequence[jax.Device] | None = None, feed: str = "auto"):
        self.devices = tuple(jax.devices() if devices is None else devices)
        self.feed = feed  # how batches reach the devices (``feeding.FEEDS``; same numbers either way)
        self.main_process = jax.process_index() == 0
        self.total_steps = 0

    def prepare(self, config: TrainConfig, ds: Dataset) -> None:
        self.config, self.ds, self.dtype = config, ds, np.dtype(config.storage_dtype())
        spec = config.model_spec()
        compiled = compiled_steps(ds.num_classes, config.optimizer, self.devices, config.penalty_options(),
                                  config.conv_impl, model=spec)  # the model, to find its capture points
        try:
            self.capture_names = capture_names(compiled[0], ds.image_shape)
        except ValueError as error:
            raise UsageError(f"--model {config.model}: {error}") from None
        self.capture_modules = resolve_penalty_layers(config, self.capture_names)
        errors = {}
        for name, path in self.capture_modules.items():  # every path must be called by the model
            try:
                capture_names(compiled[0], ds.image_shape, {name: path})
            except ValueError as error:
                errors[name] = str(error)
        if errors:
            raise UsageError(unknown_layers(list(errors), self.capture_names, next(iter(errors.values()))))
        compute = "bfloat16" if config.dtype == "bfloat16" else None
        key = ((ds.num_classes, config.optimizer, self.devices, config.penalty_options(), config.conv_impl),
               {"model": spec, "capture_modules": tuple(sorted(self.capture_modules.items())),
                "weight_decay": config.weight_decay, "decoupled": config.weight_decay_form == "decoupled",
                "compute_dtype": compute})
        self.model, self.mesh, self.step_fn, self.eval_fn = compiled_steps(*key[0], **key[1])
        attacks = config.attacks()
        self.attack_fn = (compiled_attack_eval(ds.num_classes, attacks, ds.input_range(),
                                               tuple(self.mesh.devices.flat), config.conv_impl, model=spec)
                          if attacks else None)
        check_batch_size(config.batch_size, self.mesh, len(ds.y_train))
        transform = augment_transform(config.augment, config.seed) if config.augment else None
        self.feeder = make_feeder(self.feed, ds, config.batch_size, self.dtype, self.mesh, transform)
        platform = self.mesh.devices.flat[0].platform
        self.steps_per_dispatch = resolve_steps_per_dispatch(config.steps_per_dispatch, platform,
                                                             self.feeder.mode)
        self.chunk_fn = compiled_train_chunk(*key[0], **key[1]) if self.steps_per_dispatch > 1 else None
        asked = config.steps_per_dispatch not in ("auto", 1)
        if asked and self.feeder.mode != "device" and self.main_process:
            print(f"--steps-per-dispatch {config.steps_per_dispatch}: the batches are prepared on the host "
                  "(--augment, several processes or data too large for the devices), one step per call",
                  flush=True)

    def init(self, params: Params | None) -> None:
        config, dtype = self.config, self.dtype
        shape = self.ds.image_shape
        if params is None:
            params, model_state = init_variables(self.model, shape, config.seed, dtype, config.init)
        else:
            model_state = init_model_state(self.model, shape, config.seed, dtype, config.init)
            params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
        tx = make_optimizer(config.optimizer, config.lr, weight_decay=config.weight_decay,
                            decoupled=config.weight_decay_form == "decoupled")
        self.state = jax.device_put(create_train_state(params, tx, model_state), replicated(self.mesh))
        self.lr_at = scheduled_lr(config, self.total_steps)
        self.constant_lr = config.lr_schedule == "constant" and config.warmup_steps == 0
        self.hparams = self._hparams(config.lr)
        self.t = 0  # 0-based index of the next update (the schedule's and the augmentation's step)
        self.t_first: int | None = None

    def _hparams(self, lr: float):
        return jax.device_put(hyperparams(lr, self.config.penalty_weight, self.dtype), replicated(self.mesh))

    @contextlib.contextmanager
    def checkpoints(self, workdir: Path) -> Iterator[None]:
        with checkpoint_manager(workdir, self.config.keep_checkpoints) as self.manager:
            yield

    def restore(self, record: dict[str, Any]) -> int:
        restored = restore_checkpoint(self.manager, self.state, self.config, record["dataset"])
        if restored is not None:
            self.state = restored
        self.t = int(jax.device_get(self.state.step))
        return self.t

    def step(self, indices: np.ndarray) -> dict[str, jax.Array]:
        t = self.t
        batch = self.feeder(indices, t)  # on the devices; --augment: feeding.augment_transform, (seed, t)
        if not self.constant_lr:
            self.hparams = self._hparams(self.lr_at(t))
        self._announce_compilation(self.step_fn)
        self.state, metrics = self.step_fn(self.state, batch, self.hparams)
        self.t = t + 1
        if not self.constant_lr:  # the scheduled rate into metrics.jsonl (else the loop logs --lr)
            metrics = {**metrics, "lr": self.hparams.lr}
        return metrics  # on the device until the loop fetches it

    def steps(self, indices: Sequence[np.ndarray]) -> list[ChunkStep]:
        """``len(indices)`` steps in one compiled call (``steps_per_dispatch`` > 1, data on the devices):
        the same updates as ``step`` on each in turn; one ``ChunkStep`` per step, on the device."""
        t, n, dtype = self.t, len(indices), self.dtype
        idx, real = (np.stack(a) for a in zip(*(padded_indices(i, self.config.batch_size) for i in indices),
                                              strict=True))  # (n, B) each
        lrs = [self.config.lr] * n if self.constant_lr else [self.lr_at(t + i) for i in range(n)]
        hparams = hyperparams(np.asarray(lrs), np.full(n, self.config.penalty_weight), dtype)  # (n,) each
        self._announce_compilation(self.chunk_fn)
        self.state, metrics = self.chunk_fn(self.state, self.feeder.x, self.feeder.y, idx, real, hparams)
        self.t = t + n
        if not self.constant_lr:
            metrics = {**metrics, "lr": hparams.lr}  # (n,): fetch_metrics indexes it too
        return [ChunkStep(metrics, i) for i in range(n)]

    def _announce_compilation(self, fn: Any) -> None:
        """The run's first call compiles (seconds): say so where no progress bar shows."""
        if self.t_first is None:
            self.t_first = self.t
            if self.main_process and first_call(fn, self.config.batch_size, self.dtype) \
                    and not sys.stdout.isatty():
                print(f"compiling the train step ({self.config.model}, batch {self.config.batch_size}) ...",
                      flush=True)

    def evaluate(self) -> dict[str, float]:
        args = (variables_of(self.state.params, self.state.model_state), self.ds, self.config.batch_size,
                self.dtype, self.mesh)
        result = evaluate(self.eval_fn, *args)
        if self.attack_fn is not None:  # --eval-attacks: accuracy under attack beside the clean one
            result.update(evaluate_attacks(self.attack_fn, *args))
        return result

    def save(self, step: int, record: dict[str, Any]) -> None:
        save_checkpoint(self.manager, self.state, record)

    def final(self) -> tuple[int, Params]:
        return int(jax.device_get(self.state.step)), jax.device_get(self.state.params)


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike | None = None, *,
                       params: Params | None = None, devices: Sequence[jax.Device] | None = None,
                       plots: bool = True, handle_signals: bool = False) -> TrainResult:
    """Train as ``config`` says, in ``workdir`` (default ``config.workdir``), resuming if possible.

    ``params`` (a Flax ``params`` tree, e.g. from ``torch_ref.export_flax_params``)
    replaces the seeded initialisation; ``devices`` restricts the data mesh
    (default: all). Float64 (``config.dtype``) runs inside ``jax.enable_x64``.
    ``handle_signals``: SIGTERM/Ctrl-C save a checkpoint and raise ``Interrupted`` (the CLI).

    Nothing in ``workdir`` is written until the flags, the data, config.json
    and the newest checkpoint have all been checked.
    """
    trainer = JaxTrainer(devices)
    with jax.enable_x64(config.dtype == "float64"):
        return skeleton.train_and_evaluate(config, workdir, trainer, params=params, plots=plots,
                                           handle_signals=handle_signals)
