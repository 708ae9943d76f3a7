"""The training configuration: one frozen dataclass and the flag parser that builds it.

``python -m jax_impl.train`` and ``python -m torch_ref.train`` share this
parser, so one recipe runs unchanged in both frameworks. Every field has one
flag; ``--help`` explains each in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from agp_common.errors import UsageError
from agp_common.penalty_spec import APPROXIMATIONS, NORMALIZATIONS, NORMS

DATASETS = ("digits", "cifar10", "npz", "synthetic")
OPTIMIZERS = ("sgd", "momentum", "adam")
DTYPES = ("float32", "float64")
#: Penalty options (``penalized_loss``'s ``normalization``, ``norm``, ``approx``; see the README).
PENALTY_NORMALIZATIONS = NORMALIZATIONS
PENALTY_NORMS = NORMS
PENALTY_APPROXIMATIONS = APPROXIMATIONS
#: Momentum coefficient of ``--optimizer momentum`` (optax.sgd / torch.optim.SGD).
MOMENTUM = 0.9

#: Fields that may differ when a run is resumed: how long to train, where and how to
#: report. Every other field changes the trajectory, so a mismatch is refused.
RESUMABLE_FIELDS = frozenset(
    {"data_dir", "epochs", "steps", "eval_every", "checkpoint_every", "keep_checkpoints",
     "workdir", "quiet", "tensorboard", "debug"}
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (defaults: ``python -m jax_impl.train``).

    ``epochs`` and ``steps`` are alternatives: ``steps`` counts optimizer steps;
    if both are ``None``, ``DEFAULT_EPOCHS`` epochs are run. ``eval_every`` and
    ``checkpoint_every`` count steps; ``None`` means once per epoch (and always
    at the end). ``penalty_layers=None`` penalises every capture point.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    synthetic_shape: tuple[int, int, int, int] = (512, 32, 32, 3)
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    penalty_weight: float = 10.0
    penalty_layers: tuple[str, ...] | None = None
    penalty_normalization: str = "batch_mean"
    penalty_norm: str = "squared_l2"
    penalty_every: int = 1
    penalty_approx: str = "exact"
    penalty_fd_step: float = 1e-3
    seed: int = 0
    dtype: str = "float32"
    workdir: str | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    tensorboard: bool = False
    quiet: bool = False
    debug: bool = False

    def penalty_options(self) -> dict[str, Any]:
        """Keyword options of ``penalized_loss`` (both frameworks) other than weight and layers."""
        return {"normalization": self.penalty_normalization, "norm": self.penalty_norm,
                "approx": self.penalty_approx, "fd_step": self.penalty_fd_step}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_json``; unknown keys are a ``UsageError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise UsageError(f"config has unknown field(s) {unknown}; expected a subset of {sorted(names)}")
        values = dict(record)
        for key in ("synthetic_shape", "penalty_layers"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


#: Epochs of the default run (chosen so that it finishes in a few minutes on a 2-core CPU).
DEFAULT_EPOCHS = 20


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Number of optimizer steps the run ends at."""
    if config.steps is not None:
        return config.steps
    return (config.epochs if config.epochs is not None else DEFAULT_EPOCHS) * steps_per_epoch


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def validate_config(config: TrainConfig, capture_names: Sequence[str] | None = None) -> TrainConfig:
    """Check every field that can be checked without the data; raise ``UsageError``.

    ``capture_names`` (the model's capture points) enables the check of
    ``penalty_layers``. Returns ``config`` unchanged.
    """
    _require(config.dataset in DATASETS, f"--dataset must be one of {list(DATASETS)}, got {config.dataset!r}")
    _require(config.optimizer in OPTIMIZERS,
             f"--optimizer must be one of {list(OPTIMIZERS)}, got {config.optimizer!r}")
    _require(config.dtype in DTYPES, f"--dtype must be one of {list(DTYPES)}, got {config.dtype!r}")
    _require(config.epochs is None or config.steps is None,
             f"give --epochs or --steps, not both (got --epochs {config.epochs} --steps {config.steps})")
    for name in ("epochs", "steps", "eval_every", "checkpoint_every"):
        value = getattr(config, name)
        _require(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    _require(config.batch_size >= 1, f"--batch-size must be >= 1, got {config.batch_size}")
    _require(config.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {config.keep_checkpoints}")
    _require(math.isfinite(config.lr) and config.lr > 0, f"--lr must be a finite number > 0, got {config.lr}")
    _require(math.isfinite(config.penalty_weight) and config.penalty_weight >= 0,
             f"--penalty-weight must be a finite number >= 0, got {config.penalty_weight}")
    _require(config.penalty_normalization in PENALTY_NORMALIZATIONS,
             f"--penalty-normalization must be one of {list(PENALTY_NORMALIZATIONS)}, "
             f"got {config.penalty_normalization!r}")
    _require(config.penalty_norm in PENALTY_NORMS,
             f"--penalty-norm must be one of {list(PENALTY_NORMS)}, got {config.penalty_norm!r}")
    _require(config.penalty_approx in PENALTY_APPROXIMATIONS,
             f"--penalty-approx must be one of {list(PENALTY_APPROXIMATIONS)}, got {config.penalty_approx!r}")
    _require(config.penalty_every >= 1, f"--penalty-every must be >= 1, got {config.penalty_every}")
    _require(math.isfinite(config.penalty_fd_step) and config.penalty_fd_step > 0,
             f"--penalty-fd-step must be a finite number > 0, got {config.penalty_fd_step}")
    _require(config.seed >= 0, f"--seed must be >= 0, got {config.seed}")
    _require(config.dataset != "npz" or config.data_dir is not None,
             "--dataset npz needs --data-dir naming an .npz file (or a folder holding one)")
    _require(config.dataset != "cifar10" or config.data_dir is not None,
             "--dataset cifar10 needs --data-dir naming the CIFAR-10 folder (binary or python release)")
    _require(len(config.synthetic_shape) == 4 and all(d >= 1 for d in config.synthetic_shape),
             f"--synthetic-shape must be four positive sizes N,H,W,C, got {config.synthetic_shape}")
    if config.penalty_layers is not None:
        layers = config.penalty_layers
        _require(len(layers) > 0, "--penalty-layers is empty; name capture points or say 'all'")
        _require(len(set(layers)) == len(layers), f"--penalty-layers has duplicates: {list(layers)}")
        if capture_names is not None:
            unknown = [name for name in layers if name not in capture_names]
            _require(not unknown, f"unknown --penalty-layers {unknown}; the model's capture points are "
                                  f"{list(capture_names)} (or 'all')")
    return config


def check_resumable(saved: TrainConfig, current: TrainConfig) -> None:
    """Refuse to resume a run whose trajectory-defining fields differ from the current flags."""
    diffs = [f"{f.name}: saved {getattr(saved, f.name)!r}, now {getattr(current, f.name)!r}"
             for f in dataclasses.fields(TrainConfig)
             if f.name not in RESUMABLE_FIELDS and getattr(saved, f.name) != getattr(current, f.name)]
    if diffs:
        raise UsageError("the workdir holds a run with a different config (" + "; ".join(diffs)
                         + "); use another --workdir or the same flags")


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return value


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,H,W,C such as 512,32,32,3, got {text!r}") from None
    if len(dims) != 4:
        raise argparse.ArgumentTypeError(f"expected four sizes N,H,W,C, got {text!r}")
    return dims  # type: ignore[return-value]


def _layers(text: str) -> tuple[str, ...] | None:
    if text.strip() == "all":
        return None
    return tuple(name.strip() for name in text.split(",") if name.strip())


class OneLineErrorParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line (``prog: error: ...; see --help``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def build_parser(prog: str, framework: str) -> argparse.ArgumentParser:
    """The flags of ``python -m {jax_impl,torch_ref}.train``; one line of help each."""
    d = TrainConfig()
    p = OneLineErrorParser(
        prog=prog,
        description=f"Train the seed CNN with the activation gradient penalty ({framework}). "
                    "Running the same command on the same --workdir resumes from its newest checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                   help="training data: bundled scikit-learn digits, CIFAR-10 files, your .npz, or random")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10 folder (binary or python release), or the .npz file / folder holding one")
    p.add_argument("--synthetic-shape", type=_shape, default=d.synthetic_shape,
                   help="N,H,W,C of --dataset synthetic (training examples; a fifth as many test ones)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_int, default=None,
                        help=f"passes over the training data (default {DEFAULT_EPOCHS} unless --steps)")
    length.add_argument("--steps", type=_int, default=None, help="optimizer steps (instead of --epochs)")
    p.add_argument("--batch-size", type=_int, default=d.batch_size, help="global batch size")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help=f"plain SGD as in the seed, SGD with momentum {MOMENTUM}, or Adam")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate (constant)")
    p.add_argument("--penalty-weight", type=float, default=d.penalty_weight,
                   help="weight w of sum_l ||d loss / d a_l||^2 (0 trains without the penalty)")
    p.add_argument("--penalty-layers", type=_layers, default=None,
                   help="comma-separated layers to penalise: relu1, relu2, input; 'all' = relu1,relu2")
    p.add_argument("--penalty-normalization", choices=PENALTY_NORMALIZATIONS, default=d.penalty_normalization,
                   help="batch_mean: gradients of the batch-mean loss (the seed's); per_example: "
                        "mean over examples of each example's own gradient norm (B x stronger)")
    p.add_argument("--penalty-norm", choices=PENALTY_NORMS, default=d.penalty_norm,
                   help="norm of each layer's activation gradient: squared L2 (the seed's) or L2")
    p.add_argument("--penalty-every", type=_int, default=d.penalty_every,
                   help="lazy regularisation: apply the penalty every k steps with weight k*w")
    p.add_argument("--penalty-approx", choices=PENALTY_APPROXIMATIONS, default=d.penalty_approx,
                   help="exact double backprop, or the first-order finite difference (Finlay & Oberman 2019)")
    p.add_argument("--penalty-fd-step", type=float, default=d.penalty_fd_step,
                   help="step h of --penalty-approx finite_difference")
    p.add_argument("--seed", type=_int, default=d.seed, help="seed of the initial weights and batch order")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="floating-point type of data and weights")
    p.add_argument("--workdir", default=None,
                   help=f"run folder (config, metrics, checkpoints, plots); default runs/{framework}_DATASET")
    p.add_argument("--eval-every", type=_int, default=None,
                   help="evaluate on the test split every N steps (default: each epoch and at the end)")
    p.add_argument("--checkpoint-every", type=_int, default=None,
                   help="checkpoint every N steps (default: each epoch and at the end)")
    p.add_argument("--keep-checkpoints", type=_int, default=d.keep_checkpoints,
                   help="how many of the newest checkpoints to keep")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to WORKDIR/tensorboard (needs tensorboardX)")
    p.add_argument("--quiet", action="store_true", help="plain periodic log lines instead of a progress bar")
    p.add_argument("--debug", action="store_true", help="show the full traceback of usage errors")
    return p


def parse_config(argv: Sequence[str] | None, prog: str, framework: str) -> TrainConfig:
    """Parse flags into a ``TrainConfig`` (argparse exits 2 on malformed flags)."""
    args = build_parser(prog, framework).parse_args(argv)
    values = vars(args)
    if values["workdir"] is None:
        values["workdir"] = f"runs/{framework}_{values['dataset']}"
    return TrainConfig(**values)
