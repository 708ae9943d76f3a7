"""The sweep's grid: ``SweepConfig``, its runs' labels and each run's ``TrainConfig`` (no JAX computation)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agp_app.batching import steps_per_epoch
from agp_app.config import TrainConfig
from agp_common.attack_spec import ATTACKS, DEFAULT_EPS, DEFAULT_PGD_STEP_RATIO, DEFAULT_PGD_STEPS
from agp_common.penalty_spec import INPUT
from jax_impl.model import CAPTURE_NAMES

DEFAULT_LAYER_SETS = ((INPUT,), ("relu1",), ("relu2",), ("relu1", "relu2"))
#: Per-example weights (the per-example penalty does not depend on the batch size); 0 is the baseline.
DEFAULT_WEIGHTS = (0.0, 1.0, 3.0, 10.0)
DEFAULT_NORMALIZATIONS = ("per_example",)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_NOISE = (0.2, 0.4)
DEFAULT_EPOCHS = 6
MEASURED_LAYERS = (INPUT, *CAPTURE_NAMES)
NOISE_SEED = 1234
INPUT_NORMS = "input_norms"
#: Label of the unpenalised runs in the ``layers`` and ``normalization`` columns.
NONE = "none"
#: Prefix of the attacked accuracies in a row: ``test_accuracy/fgsm@0.05``.
ATTACKED_PREFIX = "test_accuracy/"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The grid and the shared training settings of a sweep (see ``--help``)."""

    dataset: str = "digits"
    data_dir: str | None = None
    layer_sets: tuple[tuple[str, ...], ...] = DEFAULT_LAYER_SETS
    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    normalizations: tuple[str, ...] = DEFAULT_NORMALIZATIONS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    noise: tuple[float, ...] = DEFAULT_NOISE
    eval_attacks: tuple[str, ...] = ATTACKS
    eval_eps: tuple[float, ...] = DEFAULT_EPS
    eval_pgd_steps: int = DEFAULT_PGD_STEPS
    eval_pgd_step_ratio: float = DEFAULT_PGD_STEP_RATIO
    out: str = "runs/sweep_digits"

    def grid(self) -> list[tuple[int, tuple[str, ...] | None, str, float]]:
        """``(seed, layers, normalization, weight)`` of every run; ``layers=None`` is the w = 0 run."""
        points = []
        for seed in self.seeds:
            if 0.0 in self.weights:
                points.append((seed, None, NONE, 0.0))
            points += [(seed, layers, norm, w) for layers in self.layer_sets for norm in self.normalizations
                       for w in self.weights if w != 0.0]
        return points


def layers_label(layers: tuple[str, ...] | None) -> str:
    """``relu1+relu2``; ``none`` for the unpenalised run."""
    return NONE if layers is None else "+".join(layers)


def weight_label(weight: float) -> str:
    """``3`` for 3.0, ``0.1``: the short form (``:g``) when it reads back as ``weight``, else the exact
    ``repr`` (``1.0000001``), so that distinct weights never share a run folder or a row label."""
    short = f"{weight:g}"
    return short if float(short) == weight else repr(float(weight))


def run_label(layers: tuple[str, ...] | None, normalization: str, weight: float, seed: int) -> str:
    if layers is None:
        return f"none_w0_s{seed}"
    return f"{layers_label(layers)}_{normalization}_w{weight_label(weight)}_s{seed}"


def train_config(sweep: SweepConfig, seed: int, layers: tuple[str, ...] | None, normalization: str,
                 weight: float, workdir: Path, num_train: int) -> TrainConfig:
    """The ``TrainConfig`` of one grid point: quiet, evaluated and checkpointed only at the end."""
    total = sweep.epochs * steps_per_epoch(num_train, sweep.batch_size)
    return TrainConfig(
        dataset=sweep.dataset, data_dir=sweep.data_dir, epochs=sweep.epochs, batch_size=sweep.batch_size,
        optimizer=sweep.optimizer, lr=sweep.lr, penalty_weight=weight, seed=seed, workdir=str(workdir),
        quiet=True, keep_checkpoints=1, eval_every=total, checkpoint_every=total,
        penalty_layers=layers if layers is not None else DEFAULT_LAYER_SETS[-1],
        penalty_normalization=normalization if layers is not None else DEFAULT_NORMALIZATIONS[0],
        eval_attacks=sweep.eval_attacks, eval_eps=sweep.eval_eps, eval_pgd_steps=sweep.eval_pgd_steps,
        eval_pgd_step_ratio=sweep.eval_pgd_step_ratio,
    )
