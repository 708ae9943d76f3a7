"""The trainer skeleton both frameworks share: one ``train_and_evaluate``, each framework its ``Trainer``.

``train_and_evaluate(config, workdir, trainer)`` owns everything that does not depend on the
framework, in this order:

1. check the flags (``validate_config``), load and check the data, the batch size against it;
2. ``trainer.prepare``: the framework builds its model and compiled functions (JAX: the mesh);
3. the batch order and the number of steps; the run folder made; an existing config.json and
   metrics.jsonl checked (nothing written yet);
4. ``trainer.init``: the initial state (seeded, or ``params``);
5. holding the run folder's lock, inside ``trainer.checkpoints``: ``trainer.restore`` of the
   newest checkpoint, the end check (and, without a checkpoint, no metrics past the first one:
   ``check_not_reset``), config.json written, then ``run_loop`` calling ``trainer.step`` /
   ``trainer.evaluate`` / ``trainer.save``; the final evaluation (when no step ran) and the plots;
6. the one-line summary.

A framework supplies the ``Trainer`` protocol below (``agp_app.jax_train.trainer.JaxTrainer``,
``agp_app.torch_train.trainer.TorchTrainer``), and ``run_cli`` is both CLIs' ``main``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from agp_app.batching import BatchOrder, check_batch_fits
from agp_app.config import TrainConfig, parse_config, total_steps, validate_config
from agp_app.data import Dataset, load_dataset
from agp_app.errors import REPORTED_ERRORS, UsageError, report_error
from agp_app.loop import run_loop
from agp_app.plot import plot_run
from agp_app.runlog import (
    METRICS_FILE,
    check_config_file,
    check_not_reset,
    config_record,
    hold_workdir,
    prepare_workdir,
    summary_line,
    write_config,
)
from agp_common.penalty_spec import INPUT


class Trainer(Protocol):
    """What a framework supplies to ``train_and_evaluate``; it holds the model and its training state.

    ``framework`` ("jax", "torch") is recorded in config.json and every checkpoint; a run resumes
    only in its own framework. ``capture_names``: the model's capture points (``--penalty-layers``).
    ``main_process``: this process writes the run folder (False on the other hosts of a multi-host
    run). ``fetch`` / ``fetch_every``: how ``run_loop`` turns the metrics ``step`` returns into
    floats (``None``: they already are, fetched every step).
    """

    framework: str
    capture_names: Sequence[str]
    main_process: bool
    fetch: Callable[[list[Any]], list[dict[str, Any]]] | None
    fetch_every: int

    def prepare(self, config: TrainConfig, ds: Dataset) -> None:
        """Build the model and compiled functions for ``ds``; ``UsageError`` if the run cannot work here."""

    def init(self, params: Any | None) -> None:
        """The step-0 state: seeded weights, or ``params`` (a Flax-layout tree) when given."""

    def checkpoints(self, workdir: Path) -> AbstractContextManager[Any]:
        """Open WORKDIR/checkpoints for ``restore`` and ``save`` until the context ends."""

    def restore(self, record: dict[str, Any]) -> int:
        """Load the newest checkpoint (refused unless it matches ``record``); its step, 0 if none."""

    def step(self, indices: Any) -> dict[str, Any]:
        """One optimizer step on the training examples ``indices``; the step's metrics."""

    def evaluate(self) -> dict[str, float]:
        """``eval_loss``, ``eval_accuracy`` (and ``eval_accuracy/ATTACK@EPS``) on the test split."""

    def save(self, step: int, record: dict[str, Any]) -> None:
        """Checkpoint the current state as ``step`` with ``record`` beside it."""

    def final(self) -> tuple[int, Any]:
        """(steps done, parameters as NumPy arrays in the Flax layout)."""


@dataclasses.dataclass
class TrainResult:
    """What a run ended with (``params`` as NumPy arrays in the Flax layout, in both frameworks)."""

    step: int
    params: Any
    last_train: dict[str, Any] | None
    final_eval: dict[str, float] | None
    wall_s: float
    summary: str
    #: JAX: compilations of the train step during this run (1 in a fresh process, 0 when an earlier run
    #: in the same process compiled the same shapes); None for PyTorch, which compiles nothing.
    train_step_compilations: int | None = None


def check_end(start: int, total: int, workdir: Path) -> None:
    """``UsageError`` when the run folder's checkpoint is already past the requested end."""
    if start > total:
        raise UsageError(f"{workdir} holds a run at step {start}, past the requested end at step "
                         f"{total}; ask for more --steps/--epochs or use another --workdir")


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike | None, trainer: Trainer, *,
                       params: Any | None = None, plots: bool = True,
                       handle_signals: bool = False) -> TrainResult:
    """Train as ``config`` says with ``trainer``'s framework, in ``workdir`` (default ``config.workdir``),
    resuming from its newest checkpoint if there is one.

    ``params`` replaces the seeded initialisation. ``handle_signals``: SIGTERM/Ctrl-C save a
    checkpoint and raise ``Interrupted`` (the CLI). Nothing in ``workdir`` is written until the
    flags, the data, config.json and the newest checkpoint have all been checked.
    """
    t_start = time.perf_counter()
    validate_config(config, (*trainer.capture_names, INPUT))
    ds = load_dataset(config)
    check_batch_fits(config.batch_size, len(ds.y_train))
    trainer.prepare(config, ds)
    order = BatchOrder(config.seed, len(ds.y_train), config.batch_size)
    total = total_steps(config, order.steps_per_epoch)

    workdir = prepare_workdir(workdir or config.workdir)
    record = config_record(config, trainer.framework, ds.info(), trainer.capture_names)
    check_config_file(workdir, record)  # written only once the checkpoint is known to fit
    trainer.init(params)
    main_process = trainer.main_process
    # One run per workdir, and everything it writes (config.json, metrics, checkpoints, plots) is
    # written while it holds the lock, so that a run starting on the same folder cannot interleave.
    with hold_workdir(workdir, enabled=main_process), trainer.checkpoints(workdir):
        start = trainer.restore(record)
        check_end(start, total, workdir)
        if start == 0:
            check_not_reset(workdir, min(total, config.checkpoint_every or order.steps_per_epoch))
        if main_process:
            write_config(workdir, record)
        loop = run_loop(config, workdir, order, start, total, train_step=trainer.step,
                        evaluate=trainer.evaluate, save=lambda step: trainer.save(step, record),
                        main_process=main_process, handle_signals=handle_signals, fetch=trainer.fetch,
                        fetch_every=trainer.fetch_every)
        final_eval = loop.last_eval if loop.steps_run else trainer.evaluate()
        plot_paths = []
        if plots and main_process and (workdir / METRICS_FILE).exists():
            plot_paths = plot_run(workdir)
    wall = time.perf_counter() - t_start
    step, final_params = trainer.final()
    return TrainResult(step, final_params, loop.last_train, final_eval, wall,
                       summary_line(trainer.framework, total, wall, loop.last_train, final_eval, workdir,
                                    plot_paths))


def run_cli(argv: Sequence[str] | None, prog: str, framework: str,
            train: Callable[[TrainConfig], str | None]) -> int:
    """Both training CLIs' ``main``: flags -> ``train(config)``, which returns the summary line to print
    (``None``: print nothing, e.g. on the other hosts of a multi-host run).

    Usage and input errors: one line, exit 2; NaN/Inf in training: one line, exit 1;
    SIGTERM/Ctrl-C: checkpoint saved, one line, exit 143/130. ``--debug`` adds the traceback.
    """
    config = parse_config(argv, prog=prog, framework=framework)
    try:
        summary = train(config)
    except REPORTED_ERRORS as e:
        return report_error(e, config.debug)
    if summary is not None:
        print(summary, flush=True)
    return 0

