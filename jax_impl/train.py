"""``python -m jax_impl.train``: train the seed CNN with the activation gradient penalty.

``main(argv)`` only parses flags and calls ``train_and_evaluate(config,
workdir)``; everything else is small functions, importable and testable:

* ``create_train_state``: ``TrainState(step, params, opt_state)``;
* ``train_step(state, batch, hparams) -> (state, metrics)``: pure; compiled
  once by ``make_train_step`` (with ``jit_options()``) with the state donated,
  the batch sharded over a 1-D ``"data"`` mesh of all devices and the state
  replicated; the learning rate and the penalty weight are traced
  (``Hyperparams``), so runs with other values (a sweep) reuse the compilation;
* ``eval_step(params, batch) -> sums``, for the held-out split.

The metrics stay on the device: the loop fetches them every
``METRICS_EVERY`` steps (and before every evaluation and checkpoint), so the
host does not wait for each step. A step whose loss, penalty or gradient is
not finite leaves the state unchanged; the fetch that sees it stops the run
naming that step, before anything is saved.

Every batch has the same shape: the last partial batch of an epoch is
zero-padded and carries a 0/1 ``mask``, and the loss is
``sum_i m_i CE_i / sum_i m_i`` (``penalized_loss(..., example_weights=mask)``),
so loss, penalty and gradients are exactly those of the real examples, and
the step is never recompiled.

The run folder (``--workdir``) holds config.json, metrics.jsonl, orbax
checkpoints (``checkpoints/<step>/``, atomic, the newest ``--keep-checkpoints``
kept, each with the config), PNG plots and, with ``--tensorboard``, event
files. Running the same command again resumes from the newest checkpoint.

Multi-host: when ``JAX_COORDINATOR_ADDRESS`` is set (with ``JAX_NUM_PROCESSES``
and ``JAX_PROCESS_ID``), or ``AGP_DISTRIBUTED=1`` on a cluster JAX detects
(SLURM, Open MPI, Cloud TPU), ``jax.distributed.initialize`` is called first;
each process then feeds its slice of every global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agp_common.attack_spec import Attack
from agp_common.batching import BatchOrder, eval_batches, padded_batch
from agp_common.config import MOMENTUM, TrainConfig, parse_config, total_steps, validate_config
from agp_common.data import Dataset, load_dataset
from agp_common.errors import (
    REPORTED_ERRORS,
    NonFiniteError,
    UsageError,
    WriteFailed,
    report_error,
)
from agp_common.io import CHECKPOINT_OVERHEAD, ensure_free_space
from agp_common.loop import run_loop
from agp_common.penalty_spec import INPUT, PenaltyOptions
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
from jax_impl.attacks import adversarial_correct
from jax_impl.model import CAPTURE_NAMES, Net
from jax_impl.penalty import lazy_value_and_grad
from jax_impl.xla_options import jit_options

FRAMEWORK = "jax"
DATA_AXIS = "data"
CHECKPOINT_DIR = "checkpoints"
#: Steps between two fetches of the metrics from the device (fewer host-device syncs; a NaN stops the
#: run at the next fetch at the latest, with the state of the step before it).
METRICS_EVERY = 20

Params = Any


class TrainState(NamedTuple):
    """Everything a step changes: ``step`` () int32 (optimizer steps done), ``params``, ``opt_state``."""

    step: jax.Array
    params: Params
    opt_state: Any


class Hyperparams(NamedTuple):
    """The compiled step's traced scalars, () arrays of the run's dtype: new values never recompile."""

    lr: jax.Array
    penalty_weight: jax.Array


def hyperparams(lr: float, penalty_weight: float, dtype) -> Hyperparams:
    """``Hyperparams`` of the given values in ``dtype`` (what a Python float becomes in that step)."""
    return Hyperparams(jnp.asarray(lr, dtype), jnp.asarray(penalty_weight, dtype))


def make_optimizer(name: str, lr: float | jax.Array) -> optax.GradientTransformation:
    """``sgd`` (the seed's ``torch.optim.SGD``), ``momentum`` (SGD, momentum 0.9) or ``adam``.

    Same update rules as ``torch.optim.SGD(lr[, momentum])`` and
    ``torch.optim.Adam(lr)`` with their defaults (see torch_ref.train).
    ``lr`` may be traced; the optimizer state does not depend on it.
    """
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=MOMENTUM)
    if name == "adam":
        return optax.adam(lr)
    raise UsageError(f"--optimizer must be one of sgd, momentum, adam; got {name!r}")


@functools.cache
def _compiled_init(model: Net):
    # One compilation instead of dozens of small op-by-op ones (seconds on a 2-core CPU); same values.
    return jax.jit(model.init)


def init_params(model: Net, image_shape: Sequence[int], seed: int, dtype) -> Params:
    """Fresh parameters for images of ``image_shape`` (H, W, C), cast to ``dtype``."""
    params = _compiled_init(model)(jax.random.key(seed), jnp.zeros((1, *image_shape), dtype))["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


def create_train_state(params: Params, tx: optax.GradientTransformation) -> TrainState:
    """Step 0: ``params`` and a fresh optimizer state."""
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    hparams: Hyperparams,
    *,
    model: Net,
    optimizer: str,
    layers: tuple[str, ...] | None = None,
    options: PenaltyOptions | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on ``batch`` = {x (B, H, W, C), y (B,), mask (B,)}; returns the new state and metrics.

    ``total = loss + w * sum_l ||d loss / d a_l||^2`` with ``loss`` the masked
    mean cross-entropy and ``w = hparams.penalty_weight``; its gradient (double
    backprop) feeds ``make_optimizer(optimizer, hparams.lr)``. When ``total``,
    ``loss``, ``penalty`` or ``grad_norm`` is not finite the step is not
    applied (the state is returned unchanged) and its metrics show the NaN/Inf.
    Metrics: ``total``, ``loss``, ``penalty``, ``penalty/<layer>``,
    ``act_grad_norm/<layer>`` (= sqrt of that term), ``accuracy`` (masked),
    ``grad_norm`` and ``param_norm`` (global L2 norms, before the update).
    ``options`` are the penalty's options (``TrainConfig.penalty_options()``;
    ``layers``, when given, overrides ``options.layers``); ``options.every`` = k
    applies the penalty with weight k*w on steps 0, k, 2k, ... only (lazy
    regularisation, ``lazy_value_and_grad``).
    """
    options = PenaltyOptions() if options is None else options
    if layers is not None:
        options = options.replace(layers=layers)
    (total, aux), grads = lazy_value_and_grad(
        state.params, model, batch["x"], batch["y"], step=state.step, penalty_weight=hparams.penalty_weight,
        options=options, example_weights=batch["mask"])
    updates, opt_state = make_optimizer(optimizer, hparams.lr).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    mask = batch["mask"]
    correct = (jnp.argmax(aux["logits"], axis=-1) == batch["y"]).astype(mask.dtype) * mask
    metrics = {
        "total": total,
        "loss": aux["loss"],
        "penalty": aux["penalty"],
        "accuracy": jnp.sum(correct) / jnp.sum(mask),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(state.params),
    }
    for name, term in aux["penalty_terms"].items():
        metrics[f"penalty/{name}"] = term
        is_norm = options.norm == "l2"  # then the term already is a norm
        metrics[f"act_grad_norm/{name}"] = term if is_norm else jnp.sqrt(term)
    # The loop's CHECKED_FINITE: a bad step keeps the last good state, which the loop may still save.
    finite = jnp.all(jnp.isfinite(jnp.stack([total, aux["loss"], aux["penalty"], metrics["grad_norm"]])))
    new_state = TrainState(state.step + 1, params, opt_state)
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state), metrics


def eval_step(params: Params, batch: dict[str, jax.Array], *, model: Net) -> dict[str, jax.Array]:
    """Sums over the real rows of ``batch``: ``loss_sum`` (cross-entropy), ``correct``, ``count``."""
    logits = model.apply({"params": params}, batch["x"])  # (B, K)
    mask = batch["mask"]
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])  # (B,)
    correct = (jnp.argmax(logits, axis=-1) == batch["y"]).astype(mask.dtype)
    return {"loss_sum": jnp.sum(per_example * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}


def attack_eval_step(params: Params, batch: dict[str, jax.Array], *, model: Net, attacks: tuple[Attack, ...],
                     clip: tuple[float, float]) -> dict[str, jax.Array]:
    """Sums over the real rows of ``batch``: ``{attack.eval_key: examples still right under it}``.

    FGSM / PGD (``jax_impl.attacks``) within ``clip``, the data's valid range.
    """
    return adversarial_correct(model.apply, {"params": params}, batch["x"], batch["y"], attacks, clip=clip,
                               mask=batch["mask"])


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices of all processes)."""
    return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Rows split evenly over the ``"data"`` axis (inputs, labels, mask)."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


class CountingJit:
    """``jax.jit(fn, **jit_options)`` that counts in ``traces`` how many times JAX traced ``fn``.

    Under ``jit`` the Python body of ``fn`` runs only while JAX traces it: on the first call and on
    a call with an argument shape, dtype or committed sharding not traced before, never on a
    cached call. So ``traces`` counts the compilations of ``fn`` in this process, with public API
    only (``chex.assert_max_traces`` counts the same way).
    """

    def __init__(self, fn: Callable, **jit_options):
        self.traces = 0

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            self.traces += 1  # Python side effect: happens at trace time only
            return fn(*args, **kwargs)

        self.jitted = jax.jit(traced, **jit_options)

    def __call__(self, *args, **kwargs):
        return self.jitted(*args, **kwargs)


def make_train_step(model: Net, optimizer: str, layers: tuple[str, ...] | None, mesh: Mesh, *,
                    options: PenaltyOptions | None = None) -> CountingJit:
    """``train_step`` compiled for ``mesh``: state replicated and donated, batch sharded, ``Hyperparams``
    replicated and traced; with ``jit_options()``.

    The loss and penalty are those of the global batch (XLA inserts the
    cross-device reductions), so results match one device up to rounding.
    The result's ``traces`` counts its compilations.
    """
    step = functools.partial(train_step, model=model, optimizer=optimizer, layers=layers, options=options)
    return CountingJit(step, in_shardings=(replicated(mesh), batch_sharded(mesh), replicated(mesh)),
                       out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0,
                       **jit_options(conv_impl=model.conv_impl))


def make_eval_step(model: Net, mesh: Mesh):
    """``eval_step`` compiled for ``mesh`` (params replicated, batch sharded), with ``jit_options()``."""
    return jax.jit(functools.partial(eval_step, model=model),
                   in_shardings=(replicated(mesh), batch_sharded(mesh)), out_shardings=replicated(mesh),
                   **jit_options(conv_impl=model.conv_impl))


@functools.lru_cache(maxsize=16)
def compiled_steps(num_classes: int, optimizer: str, devices: tuple[jax.Device, ...],
                   options: PenaltyOptions | None = None, conv_impl: str = "auto"):
    """``(model, mesh, train_step_fn, eval_step_fn)`` for a run, built once per process and key.

    Runs in one process with the same model, optimizer, penalty options and devices (tests, sweeps)
    share one jitted step whatever their learning rate and penalty weight, so XLA compiles each
    (shape, dtype) only once. ``conv_impl``: ``Net``'s convolution algorithm (``--conv-impl``).
    """
    model, mesh = Net(num_classes=num_classes, conv_impl=conv_impl), data_mesh(devices)
    step_fn = make_train_step(model, optimizer, None, mesh, options=options)
    return model, mesh, step_fn, make_eval_step(model, mesh)


@functools.lru_cache(maxsize=16)
def compiled_attack_eval(num_classes: int, attacks: tuple[Attack, ...], clip: tuple[float, float],
                         devices: tuple[jax.Device, ...], conv_impl: str = "auto"):
    """``attack_eval_step`` compiled for the mesh of ``devices`` (params replicated, batch sharded), once
    per process and key (a sweep's runs share it)."""
    mesh = data_mesh(devices)
    model = Net(num_classes=num_classes, conv_impl=conv_impl)
    step = functools.partial(attack_eval_step, model=model, attacks=attacks, clip=clip)
    return jax.jit(step, in_shardings=(replicated(mesh), batch_sharded(mesh)), out_shardings=replicated(mesh),
                   **jit_options(conv_impl=conv_impl))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host batch -> global arrays sharded over ``mesh``; with several processes each sends its rows."""
    sharding = batch_sharded(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    rows = len(batch["mask"]) // jax.process_count()
    lo = jax.process_index() * rows
    return {k: jax.make_array_from_process_local_data(sharding, v[lo : lo + rows], v.shape)
            for k, v in batch.items()}


def check_batch_size(batch_size: int, mesh: Mesh, num_train: int) -> None:
    """``UsageError`` unless 1 <= B <= N and B divides evenly over the devices and processes."""
    if batch_size > num_train:
        raise UsageError(f"--batch-size {batch_size} is larger than the {num_train} training examples")
    n = mesh.devices.size
    if batch_size % n or batch_size % jax.process_count():
        raise UsageError(f"--batch-size {batch_size} must be a multiple of the number of devices ({n}) "
                         f"so that every device gets the same number of examples")


def evaluate(eval_fn, params: Params, ds: Dataset, batch_size: int, dtype, mesh: Mesh) -> dict[str, float]:
    """``eval_loss`` (mean cross-entropy) and ``eval_accuracy`` over the whole test split."""
    sums = [eval_fn(params, put_batch(padded_batch(ds.x_test, ds.y_test, idx, batch_size, dtype,
                                                     ds.pixel_scale), mesh))
            for idx in eval_batches(len(ds.y_test), batch_size)]
    sums = jax.device_get(sums)  # one sync for the whole pass
    total = {k: float(np.sum([s[k] for s in sums], dtype=np.float64)) for k in sums[0]}
    count = total["count"]
    return {"eval_loss": total["loss_sum"] / count, "eval_accuracy": total["correct"] / count}


def evaluate_attacks(attack_fn, params: Params, ds: Dataset, batch_size: int, dtype, mesh: Mesh
                     ) -> dict[str, float]:
    """``{eval_accuracy/ATTACK@EPS: test accuracy}`` under each attack of ``compiled_attack_eval``."""
    sums = [attack_fn(params, put_batch(padded_batch(ds.x_test, ds.y_test, idx, batch_size, dtype,
                                                       ds.pixel_scale), mesh))
            for idx in eval_batches(len(ds.y_test), batch_size)]
    sums = jax.device_get(sums)  # one sync for the whole pass
    return {k: float(np.sum([s[k] for s in sums], dtype=np.float64)) / len(ds.y_test) for k in sums[0]}


def checkpoint_manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
    """Orbax manager of WORKDIR/checkpoints: synchronous (the next step donates the state), atomic
    (written to a temporary folder, then renamed; temporary folders of a killed save are removed at
    start), the newest ``keep`` kept."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True,
                                           cleanup_tmp_directories=True)  # leftovers of a killed save
    return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


@jax.jit
def all_finite(tree) -> jax.Array:
    """() bool: every entry of every leaf is finite."""
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, record: dict[str, Any]) -> None:
    """Save ``state`` under its step, with the run's config record beside it.

    Refuses (``NonFiniteError``) parameters or optimizer state with NaN/Inf, so a
    checkpoint never holds a diverged state (the newest one stays the newest good one).
    """
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():
        return
    if not bool(all_finite((state.params, state.opt_state))):
        raise NonFiniteError(f"step {step}: the parameters or optimizer state are NaN/Inf after the update; "
                             f"not saved (the newest checkpoint, step {manager.latest_step()}, is intact); "
                             "try a smaller --lr or --penalty-weight")
    try:
        arrays = sum(leaf.nbytes for leaf in jax.tree.leaves((state.params, state.opt_state)))
        ensure_free_space(manager.directory, arrays + CHECKPOINT_OVERHEAD)  # before orbax starts writing
        with _orbax_errors_unlogged():
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       config=ocp.args.JsonSave(record)))
    except Exception as e:  # disk full, quota, I/O: orbax and tensorstore raise many types
        gc.collect()  # finalise orbax's abandoned write coroutines now, not noisily at interpreter exit
        raise WriteFailed("checkpoint", manager.directory / str(step), e) from e


@contextlib.contextmanager
def _orbax_errors_unlogged():
    """Drop the ERROR records orbax's worker threads log (with tracebacks) for a failed save: the
    error itself reaches ``save_checkpoint``, which reports it once (with its traceback under --debug)."""
    logger = logging.getLogger("absl")

    def below_error(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    logger.addFilter(below_error)
    try:
        yield
    finally:
        logger.removeFilter(below_error)


def first_line(error: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (orbax and tensorstore messages run over many lines)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def restore_checkpoint(manager: ocp.CheckpointManager, like: TrainState, config: TrainConfig,
                       dataset_info: dict[str, Any] | None = None) -> TrainState | None:
    """The newest checkpoint restored into the structure, dtypes and shardings of ``like``, or ``None``.

    ``UsageError`` (one line, exit 2) when it is unreadable, corrupt or truncated, was written with
    another config or for data of another shape (``dataset_info``), or does not fit ``like``.
    """
    step = manager.latest_step()
    if step is None:
        return None
    where = f"checkpoint {manager.directory / str(step)}"
    advice = (f"move it away to resume from the one before (steps saved: {list(manager.all_steps())}), "
              "or use another --workdir")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # orbax raises many types for unreadable folders
        raise UsageError(f"{where}: unreadable, corrupt or truncated ({first_line(e)}); {advice}") from None
    check_saved_config(saved, config, FRAMEWORK, where, dataset_info)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:
        raise UsageError(f"{where}: does not restore into this model's state, corrupt or from another model "
                         f"({first_line(e)}); {advice}") from None
    if int(jax.device_get(restored["state"].step)) != step:
        raise UsageError(f"{where}: holds step {int(restored['state'].step)}, not {step}; {advice}")
    return restored["state"]


@dataclasses.dataclass
class TrainResult:
    """What a run ended with (``params`` as NumPy arrays in the Flax layout)."""

    step: int
    params: Params
    last_train: dict[str, Any] | None
    final_eval: dict[str, float] | None
    wall_s: float
    #: Compilations of the train step during this run: 1 for a fresh process, 0 when an earlier run in
    #: the same process compiled the same shapes, whatever its learning rate and penalty weight (never
    #: more: padded partial batches reuse the step).
    train_step_compilations: int
    summary: str


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
    with jax.enable_x64(config.dtype == "float64"):
        return _train_and_evaluate(config, Path(workdir or config.workdir), params, devices, plots,
                                   handle_signals)


def _train_and_evaluate(config, workdir, params, devices, plots, handle_signals) -> TrainResult:
    t_start = time.perf_counter()
    validate_config(config, (*CAPTURE_NAMES, INPUT))
    dtype = np.dtype(config.dtype)
    main_process = jax.process_index() == 0
    ds = load_dataset(config)
    model, mesh, step_fn, eval_fn = compiled_steps(
        ds.num_classes, config.optimizer, tuple(jax.devices() if devices is None else devices),
        config.penalty_options(), config.conv_impl)
    tx = make_optimizer(config.optimizer, config.lr)
    compiled_before = step_fn.traces
    attacks = config.attacks()
    attack_fn = (compiled_attack_eval(ds.num_classes, attacks, ds.input_range(), tuple(mesh.devices.flat),
                                      config.conv_impl) if attacks else None)
    check_batch_size(config.batch_size, mesh, len(ds.y_train))
    order = BatchOrder(config.seed, len(ds.y_train), config.batch_size)
    total = total_steps(config, order.steps_per_epoch)

    workdir = prepare_workdir(workdir)
    record = config_record(config, FRAMEWORK, ds.info())
    check_config_file(workdir, record)  # written only once the checkpoint is known to fit

    if params is None:
        params = init_params(model, ds.image_shape, config.seed, dtype)
    else:
        params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
    state = jax.device_put(create_train_state(params, tx), replicated(mesh))
    hparams = jax.device_put(hyperparams(config.lr, config.penalty_weight, dtype), replicated(mesh))

    with hold_workdir(workdir, enabled=main_process), \
            checkpoint_manager(workdir, config.keep_checkpoints) as manager:
        restored = restore_checkpoint(manager, state, config, record["dataset"])
        if restored is not None:
            state = restored
        start = int(jax.device_get(state.step))
        if start > total:
            raise UsageError(f"{workdir} holds a run at step {start}, past the requested end at step "
                             f"{total}; ask for more --steps/--epochs or use another --workdir")
        if main_process:
            write_config(workdir, record)

        def run_step(indices):
            nonlocal state
            batch = padded_batch(ds.x_train, ds.y_train, indices, config.batch_size, dtype, ds.pixel_scale)
            state, metrics = step_fn(state, put_batch(batch, mesh), hparams)
            return metrics  # on the device until the loop fetches it

        def run_eval():
            result = evaluate(eval_fn, state.params, ds, config.batch_size, dtype, mesh)
            if attack_fn is not None:  # --eval-attacks: accuracy under attack beside the clean one
                result.update(evaluate_attacks(attack_fn, state.params, ds, config.batch_size, dtype, mesh))
            return result

        loop = run_loop(config, workdir, order, start, total, train_step=run_step, evaluate=run_eval,
                        save=lambda step: save_checkpoint(manager, state, record), main_process=main_process,
                        handle_signals=handle_signals, fetch=jax.device_get, fetch_every=METRICS_EVERY)
    final_eval = loop.last_eval if loop.steps_run else run_eval()
    plot_paths = []
    if plots and main_process and (workdir / "metrics.jsonl").exists():
        plot_paths = plot_run(workdir)
    wall = time.perf_counter() - t_start
    return TrainResult(
        step=int(jax.device_get(state.step)),
        params=jax.device_get(state.params),
        last_train=loop.last_train,
        final_eval=final_eval,
        wall_s=wall,
        train_step_compilations=step_fn.traces - compiled_before,
        summary=summary_line(FRAMEWORK, total, wall, loop.last_train, final_eval, workdir, plot_paths),
    )


def distributed_launch() -> bool:
    """Whether the environment asks for a multi-process launch (see ``maybe_initialize_distributed``)."""
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or os.environ.get("AGP_DISTRIBUTED") == "1"


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize`` when a multi-process launch is configured; True if it did.

    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) plus ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; or ``AGP_DISTRIBUTED=1`` to let JAX detect SLURM, Open MPI or Cloud TPU.
    """
    if not distributed_launch():
        return False
    env, kwargs = os.environ, {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)  # without an address: JAX detects SLURM, Open MPI or Cloud TPU
    return True


#: ``--cpu-devices auto`` gives each JAX CPU device at least this many examples of the batch: at
#: batch 128 two devices on two cores beat one (XLA's CPU convolutions use two cores poorly), at
#: batch 32 one device is faster (docs/performance.md).
EXAMPLES_PER_CPU_DEVICE = 64
#: The XLA flag that also sets the number of CPU devices; when the user set it, auto leaves it alone.
FORCE_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def choose_cpu_devices(batch_size: int, cores: int) -> int:
    """``--cpu-devices auto``: the most CPU devices with >= ``EXAMPLES_PER_CPU_DEVICE`` examples each,
    at most one per core, that divide ``batch_size`` evenly (1 for small batches)."""
    most = max(1, min(cores, batch_size // EXAMPLES_PER_CPU_DEVICE))
    return next(n for n in range(most, 0, -1) if batch_size % n == 0)


def auto_cpu_devices(config: TrainConfig, cores: int, xla_flags: str, distributed: bool) -> int:
    """``--cpu-devices auto``: ``choose_cpu_devices``, or 1 where splitting would not help or is not
    ours to do: several processes train together, the user's ``xla_flags`` set the device count, or
    the convolutions are oneDNN's (their custom calls have no sharding rule, so XLA would gather the
    whole batch on every device; they thread over the batch themselves)."""
    if distributed or config.conv_impl == "onednn" or FORCE_DEVICE_COUNT_FLAG in xla_flags:
        return 1
    return choose_cpu_devices(config.batch_size, cores)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_cpu_devices(config: TrainConfig, distributed: bool) -> int | None:
    """Set JAX's number of CPU devices for this process from ``config.cpu_devices``; the number set.

    Takes effect only before JAX's backends start (the CLI calls it first). ``None`` (nothing set):
    auto chose one device (``auto_cpu_devices``), or JAX already runs in this process (an earlier
    ``main`` call) and auto keeps its devices. Only the CPU backend reads it: on a GPU or
    TPU machine JAX's devices, and the run, are unchanged. ``UsageError`` if an explicit count cannot
    be applied any more.
    """
    count = config.cpu_devices
    if count is None:
        count = auto_cpu_devices(config, usable_cores(), os.environ.get("XLA_FLAGS", ""), distributed)
        if count == 1:
            return None
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX's backends already started in this process: its devices are fixed
        have = len(jax.devices("cpu"))
        if config.cpu_devices is not None and have != count:
            raise UsageError(f"--cpu-devices {count}: JAX already runs with {have} CPU devices in this "
                             f"process; pass the flag to a fresh process") from None
        return None
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: flags -> ``train_and_evaluate``.

    Usage and input errors: one line, exit 2; NaN/Inf in training: one line, exit 1;
    SIGTERM/Ctrl-C: checkpoint saved, one line, exit 143/130. ``--debug`` adds the traceback.
    """
    config = parse_config(argv, prog="python -m jax_impl.train", framework=FRAMEWORK)
    try:
        validate_config(config)  # before --cpu-devices is applied
        cpu_devices = configure_cpu_devices(config, distributed=distributed_launch())
        maybe_initialize_distributed()
        if cpu_devices and config.cpu_devices is None and jax.default_backend() == "cpu":
            print(f"JAX on CPU: the batch of {config.batch_size} is split over {cpu_devices} devices, one "
                  f"per core (--cpu-devices 1 turns this off)", flush=True)
        # One process: a signal stops it at a step boundary. Several: every process would have to
        # agree on the step, so a signal kills as usual and the run resumes from its last checkpoint.
        result = train_and_evaluate(config, handle_signals=jax.process_count() == 1)
    except REPORTED_ERRORS as e:
        return report_error(e, config.debug)
    if jax.process_index() == 0:
        print(result.summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
