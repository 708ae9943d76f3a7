"""The JAX trainer's checkpoints: orbax folders WORKDIR/checkpoints/<step>/ with the state and the config."""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from agp_app.checkpoints import (
    CHECKPOINT_DIR,
    DIGEST_KEY,
    arrays_digest,
    check_digest,
    diverged,
    does_not_fit,
    restore_advice,
    unreadable,
)
from agp_app.config import TrainConfig
from agp_app.errors import UsageError, WriteFailed
from agp_app.io import CHECKPOINT_OVERHEAD, ensure_free_space
from agp_app.jax_train.state import TrainState
from agp_app.runlog import check_saved_config

FRAMEWORK = "jax"


def checkpoint_manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
    """Orbax manager of WORKDIR/checkpoints: synchronous (the next step donates the state), atomic
    (written to a temporary folder, then renamed; temporary folders of a killed save are removed at
    start), the newest ``keep`` kept."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True,
                                           cleanup_tmp_directories=True)  # leftovers of a killed save
    return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def state_digest(state: TrainState) -> str:
    """``arrays_digest`` of every leaf of ``state`` (fetched to the host), named by its tree path."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state))
    return arrays_digest((jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf in leaves)


@jax.jit
def all_finite(tree) -> jax.Array:
    """() bool: every entry of every leaf is finite."""
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, record: dict[str, Any]) -> None:
    """Save ``state`` under its step, with the run's config record and the state's digest beside it.

    Refuses (``NonFiniteError``) parameters or optimizer state with NaN/Inf, so a
    checkpoint never holds a diverged state (the newest one stays the newest good one).
    """
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():
        return
    if not bool(all_finite((state.params, state.opt_state))):
        raise diverged(step, manager.latest_step())
    try:
        arrays = sum(leaf.nbytes for leaf in jax.tree.leaves((state.params, state.opt_state)))
        ensure_free_space(manager.directory, arrays + CHECKPOINT_OVERHEAD)  # before orbax starts writing
        with _orbax_errors_unlogged():
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       config=ocp.args.JsonSave(
                                                           {**record, DIGEST_KEY: state_digest(state)})))
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


def restore_checkpoint(manager: ocp.CheckpointManager, like: TrainState, config: TrainConfig,
                       dataset_info: dict[str, Any] | None = None) -> TrainState | None:
    """The newest checkpoint restored into the structure, dtypes and shardings of ``like``, or ``None``.

    ``UsageError`` (one line, exit 2) when it is unreadable, corrupt or truncated, was written with
    another config or for data of another shape (``dataset_info``), does not fit ``like``, or its
    arrays do not match the digest saved with them (damaged on disk).
    """
    step = manager.latest_step()
    if step is None:
        return None
    where = f"checkpoint {manager.directory / str(step)}"
    steps = list(manager.all_steps())
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # orbax raises many types for unreadable folders
        raise unreadable(where, e, steps) from None
    check_saved_config(saved, config, FRAMEWORK, where, dataset_info)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:
        raise does_not_fit(where, e, steps) from None
    check_digest(where, saved, state_digest(restored["state"]), steps)  # never train on damaged arrays
    if int(jax.device_get(restored["state"].step)) != step:
        raise UsageError(f"{where}: holds step {int(restored['state'].step)}, not {step}; "
                         f"{restore_advice(steps)}")
    return restored["state"]
