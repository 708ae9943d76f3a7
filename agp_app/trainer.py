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
from agp_app.config import TrainConfig, total_steps, validate_config
from agp_app.data import Dataset, load_dataset
from agp_app.errors import REPORTED_ERRORS, UsageError, report_error, report_signal_stop
from agp_app.flags import parse_config
from agp_app.interrupts import SignalStop, stop_on_signals
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
from agp_app.schedules import check_schedule, learning_rate
from agp_common.penalty_spec import INPUT

#: Key of config.json's record of what the penalty acts on: ``{name: module path, or "capture()"}``.
PENALISED = "penalised"
#: Key of config.json's record of the network: ``ModelSpec.to_json()``.
MODEL = "model"


class Trainer(Protocol):
    """What a framework supplies to ``train_and_evaluate``; it holds the model and its training state.

    ``framework`` ("jax", "torch") is recorded in config.json and every checkpoint; a run resumes
    only in its own framework. ``capture_names``: the model's capture points (``--penalty-layers``).
    ``main_process``: this process writes the run folder (False on the other hosts of a multi-host
    run). ``fetch`` / ``fetch_every``: how ``run_loop`` turns the metrics ``step`` returns into
    floats (``None``: they already are, fetched every step). Optional: ``steps_per_dispatch`` N > 1
    with ``steps(list of indices) -> list of metrics``, several steps per call (``run_loop``'s
    ``train_steps``; JAX's ``--steps-per-dispatch``); without them, one step per call.
    """

    framework: str
    capture_names: Sequence[str]
    capture_modules: dict[str, str]
    total_steps: int
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


def resolve_penalty_layers(config: TrainConfig, capture_names: Sequence[str]) -> dict[str, str]:
    """``{name: module path}`` of the ``--penalty-layers`` that are not ``capture_names`` nor ``input``:
    those are module paths, captured by forward hooks (PyTorch) or interception (Flax) under their
    own spelling as name (``layer1.0``). ``UsageError`` when nothing would be penalised: a model
    without ``capture()`` points (resnet18, most own models) and no ``--penalty-layers``."""
    layers = config.penalty_layers
    if layers is None:
        if not capture_names:
            raise UsageError(f"--model {config.model} has no capture() points: name the layers to penalise "
                             "by module path with --penalty-layers (e.g. layer1.0,layer2.0 for resnet18; "
                             "jax_impl.capture_points / torch_ref.capture_points list them)")
        return {}
    return {name: name for name in layers if name not in capture_names and name != INPUT}


def unknown_layers(names: Sequence[str], capture_names: Sequence[str], detail: str) -> str:
    """The one-line error for ``--penalty-layers`` ``names`` that are neither capture points nor called
    module paths; ``detail``: the framework's word on the paths (the nearest ones)."""
    return (f"unknown --penalty-layers {list(names)}: not among the model's capture() points "
            f"{list(capture_names)} (or 'input', or 'all') nor a module path it calls; {detail}")


def penalised_record(config: TrainConfig, capture_names: Sequence[str],
                     capture_modules: dict[str, str]) -> dict[str, str]:
    """config.json's ``penalised``: each penalised name -> its module path, ``"capture()"`` or ``"input"``."""
    names = config.penalty_layers if config.penalty_layers is not None else tuple(capture_names)
    return {name: capture_modules.get(name, INPUT if name == INPUT else "capture()") for name in names}


def scheduled_lr(config: TrainConfig, total: int) -> Callable[[int], float]:
    """The learning rate of the 0-based update ``t`` (``--lr-schedule``, ``--warmup-steps``);
    ``UsageError`` when the schedule does not fit the run (warm-up not shorter than the run)."""
    keywords = {"base_lr": config.lr, "schedule": config.lr_schedule, "total_steps": total,
                "warmup_steps": config.warmup_steps}
    try:
        check_schedule(**keywords)
    except ValueError as error:
        raise UsageError(f"--lr-schedule {config.lr_schedule} --warmup-steps {config.warmup_steps} over "
                         f"{total} steps: {error}") from None
    return lambda t: learning_rate(t, **keywords)


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
    validate_config(config)
    ds = load_dataset(config)
    check_batch_fits(config.batch_size, len(ds.y_train))
    trainer.prepare(config, ds)
    validate_config(config, (*trainer.capture_names, *trainer.capture_modules, INPUT))
    order = BatchOrder(config.seed, len(ds.y_train), config.batch_size)
    total = total_steps(config, order.steps_per_epoch)
    scheduled_lr(config, total)  # UsageError before anything is written

    workdir = prepare_workdir(workdir or config.workdir)
    record = config_record(config, trainer.framework, ds.info(), trainer.capture_names)
    record[MODEL] = config.model_spec().to_json()
    record[PENALISED] = penalised_record(config, trainer.capture_names, trainer.capture_modules)
    check_config_file(workdir, record)  # written only once the checkpoint is known to fit
    trainer.total_steps = total
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
        chunk = getattr(trainer, "steps_per_dispatch", 1)
        penalty_steps = PenaltySteps(config, start, trainer.step, getattr(trainer, "steps", None))
        loop = run_loop(config, workdir, order, start, total, train_step=penalty_steps.step,
                        evaluate=trainer.evaluate, save=lambda step: trainer.save(step, record),
                        main_process=main_process, handle_signals=handle_signals, fetch=trainer.fetch,
                        fetch_every=trainer.fetch_every,
                        train_steps=penalty_steps.steps if chunk > 1 else None, steps_per_dispatch=chunk)
        final_eval = loop.last_eval if loop.steps_run else trainer.evaluate()
        plot_paths = []
        if plots and main_process and (workdir / METRICS_FILE).exists():
            plot_paths = plot_run(workdir)
    wall = time.perf_counter() - t_start
    step, final_params = trainer.final()
    last_penalty = penalty_steps.last(trainer.fetch)
    line = summary_line(trainer.framework, total, wall, loop.last_train, final_eval, workdir, plot_paths)
    return TrainResult(step, final_params, loop.last_train, final_eval, wall,
                       run_summary(line, config, start, total, loop.steps_run, wall, last_penalty))


class PenaltySteps:
    """Wraps ``Trainer.step`` (and ``Trainer.steps``) to keep the metrics of the last step that carried
    the penalty (``--penalty-every k``: the 0-based steps 0, k, 2k, ...), for the summary."""

    def __init__(self, config: TrainConfig, start: int, step: Callable[[Any], Any],
                 steps: Callable[[list[Any]], list[Any]] | None = None):
        self.every, self.t, self._step, self._steps = config.penalty_every, start, step, steps
        self.metrics: Any = None
        self.step_number: int | None = None

    def step(self, indices: Any) -> Any:
        return self._seen([self._step(indices)])[0]

    def steps(self, indices: list[Any]) -> list[Any]:
        assert self._steps is not None, "the trainer has no steps()"
        return self._seen(self._steps(indices))

    def _seen(self, metrics: list[Any]) -> list[Any]:
        for m in metrics:
            if self.t % self.every == 0:
                self.metrics, self.step_number = m, self.t + 1
            self.t += 1
        return metrics

    def last(self, fetch: Callable[[list[Any]], list[dict[str, Any]]] | None) -> tuple[int, float] | None:
        """(1-based step, penalty) of the last penalty step this process ran, or None."""
        if self.metrics is None:
            return None
        metrics = fetch([self.metrics])[0] if fetch is not None else self.metrics
        return self.step_number, float(metrics["penalty"])


def run_summary(line: str, config: TrainConfig, start: int, total: int, steps_run: int, wall: float,
                last_penalty: tuple[int, float] | None) -> str:
    """``summary_line`` with its head saying what this process did ("already complete at step N",
    "resumed at step S, trained N steps in T s", "N steps in T s") and, with ``--penalty-every k``
    (k > 1), which steps carried the penalty and its last value on one of them."""
    head, sep, rest = line.partition("; ")
    framework = head.split(":", 1)[0]
    if steps_run == 0:
        head = f"{framework}: already complete at step {total} (nothing left to train; {wall:.1f}s)"
    elif start:
        head = f"{framework}: resumed at step {start}, trained {steps_run} steps in {wall:.1f}s"
    else:
        head = f"{framework}: {steps_run} steps in {wall:.1f}s"
    every = config.penalty_every
    if every > 1 and config.penalty_weight > 0:
        parts = [p for p in rest.split("; ") if p]
        parts = [p.split(", penalty ")[0] if p.startswith("last train loss") else p for p in parts]
        where = (f"last {last_penalty[1]:.3e} at step {last_penalty[0]}" if last_penalty is not None
                 else "none in this process")
        parts.insert(len(parts) - 1, f"penalty on every {_ordinal(every)} step ({where})")
        rest = "; ".join(parts)
    return head + sep + rest


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def run_cli(argv: Sequence[str] | None, prog: str, framework: str,
            train: Callable[[TrainConfig], str | None]) -> int:
    """Both training CLIs' ``main``: flags -> ``train(config)``, which returns the summary line to print
    (``None``: print nothing, e.g. on the other hosts of a multi-host run).

    Usage and input errors: one line, exit 2; NaN/Inf in training: one line, exit 1;
    SIGTERM/Ctrl-C: checkpoint saved, one line, exit 143/130. ``--debug`` adds the traceback.
    """
    config = parse_config(argv, prog=prog, framework=framework)
    try:
        with stop_on_signals():  # start-up, final evaluation, plots: one line, 128 + signum
            summary = train(config)
    except REPORTED_ERRORS as e:
        return report_error(e, config.debug)
    except SignalStop as e:
        return report_signal_stop(e.signum, config.debug, e)
    if summary is not None:
        print(summary, flush=True)
    return 0

