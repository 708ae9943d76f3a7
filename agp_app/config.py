"""The training configuration: one frozen dataclass, its checks and the run's default folder.

``TrainConfig`` is what both training CLIs run (``python -m jax_impl.train`` and ``python -m
torch_ref.train``), saved as config.json in every run folder. ``validate_config`` checks a config
as a whole; ``trajectory_fields`` and ``check_resumable`` decide whether a run folder may be
resumed with it. The flag parser that builds a config is ``agp_app.flags`` (``build_parser``,
``parse_config``); those names are importable from here too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

from agp_app.augment import parse_augment
from agp_app.dataset import MAX_CLASSES
from agp_app.errors import UsageError
from agp_app.model_spec import BUILTIN_MODELS, parse_model_spec
from agp_app.schedules import SCHEDULES
from agp_common.attack_spec import (
    DEFAULT_EPS,
    DEFAULT_PGD_STEP_RATIO,
    DEFAULT_PGD_STEPS,
    Attack,
    AttackOptionError,
    attack_grid,
)
from agp_common.penalty_spec import PenaltyOptionError, PenaltyOptions

DATASETS = ("digits", "cifar10", "npz", "synthetic")
OPTIMIZERS = ("sgd", "momentum", "adam")
#: ``bfloat16``: mixed precision (float32 data, master weights and optimizer state; the forward, the
#: penalty's double backprop and the gradients computed in bfloat16).
DTYPES = ("float32", "float64", "bfloat16")
#: ``--init``: each framework's own seeded initialisation, or the framework-free draw of
#: ``agp_app.shared_init`` (the same weights in both CLIs for the built-in models).
INITS = ("seeded", "shared")
#: ``--weight-decay-form``: coupled (L2 in the gradient, ``torch.optim.SGD(weight_decay)``, Adam's
#: ``weight_decay``) or decoupled (SGDW / AdamW); ``agp_app.optim`` gives both update rules.
WEIGHT_DECAY_FORMS = ("coupled", "decoupled")
#: The JAX model's convolution algorithms (``--conv-impl``): ``jax_impl.conv_impl.CONV_IMPLS``, kept
#: here as a plain tuple so that the flags import no JAX (tests/test_layers.py checks they agree).
CONV_IMPLS = ("auto", "xla", "canonical", "im2col", "onednn")
#: Momentum coefficient of ``--optimizer momentum`` (optax.sgd / torch.optim.SGD).
MOMENTUM = 0.9
#: ``--lr`` when not given, per ``--optimizer``. SGD's is the seed recipe's tuned
#: value on digits; momentum 0.9 multiplies the step by ~10, so it gets a tenth;
#: Adam's is its usual 1e-3 (0.05 makes Adam diverge to chance accuracy).
DEFAULT_LR = {"sgd": 0.05, "momentum": 0.005, "adam": 0.001}
#: Epochs of the default run (chosen so that it finishes in a few minutes on a 2-core CPU).
DEFAULT_EPOCHS = 20
#: The prefix of the ``TrainConfig`` field (and the flag) of each ``PenaltyOptions`` field.
PENALTY_PREFIX = "penalty_"

#: Fields that may differ when a run is resumed: how long to train, where and how to
#: report and evaluate. Every other field changes the trajectory, so a mismatch is refused.
RESUMABLE_FIELDS = frozenset(
    {"data_dir", "epochs", "steps", "eval_every", "checkpoint_every", "keep_checkpoints",
     "workdir", "quiet", "tensorboard", "debug", "cpu_devices", "conv_impl", "steps_per_dispatch",
     "eval_attacks", "eval_eps", "eval_pgd_steps", "eval_pgd_step_ratio"}
)
#: The prefix of the ``TrainConfig`` field (and the flag) of each attack option.
EVAL_PREFIX = "eval_"

#: The flag parser's names (``agp_app.flags``), importable from here as before.
_FLAG_NAMES = ("OneLineErrorParser", "build_parser", "parse_config")


def __getattr__(name: str) -> Any:
    """``build_parser`` and the other ``_FLAG_NAMES`` from ``agp_app.flags``, on first use (PEP 562):
    that module imports this one, so importing it here at the top would be a cycle."""
    if name in _FLAG_NAMES:
        from agp_app import flags

        return getattr(flags, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_PENALTY_DEFAULTS = PenaltyOptions()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (defaults: ``python -m jax_impl.train``).

    ``epochs`` and ``steps`` are alternatives: ``steps`` counts optimizer steps;
    if both are ``None``, ``DEFAULT_EPOCHS`` epochs are run. ``lr=None`` means
    ``DEFAULT_LR[optimizer]`` (filled in when the config is made, so it is
    recorded). ``eval_every`` and ``checkpoint_every`` count steps; ``None``
    means once per epoch (and always at the end). The ``penalty_*`` fields
    other than the weight are ``PenaltyOptions``' fields
    (``penalty_options()``); ``penalty_layers=None`` penalises every capture point.
    ``cpu_devices`` (JAX on CPU only; ``None``: chosen from the batch size and the
    cores, ``jax_impl.train.choose_cpu_devices``) splits the CPU into that many
    JAX devices for data parallelism; it changes speed, not the run, so a resume
    may change it, as it may change ``conv_impl`` (JAX's convolution algorithm, which
    moves only float rounding) or ``steps_per_dispatch`` (JAX: train steps per compiled
    call, ``"auto"`` or N >= 1; the same numbers, ``agp_app.jax_train.dispatch``).
    ``eval_attacks`` (``None``: none) are evaluated at every ``eval_eps`` on the test
    split next to the clean accuracy (``attacks()``, agp_common/attack_spec.py).
    """

    dataset: str = "digits"
    model: str = "cnn"
    model_args: str | None = None
    init: str = "seeded"
    data_dir: str | None = None
    synthetic_shape: tuple[int, int, int, int] = (512, 32, 32, 3)
    num_classes: int | None = None
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    weight_decay_form: str = "coupled"
    augment: tuple[str, ...] = ()
    penalty_weight: float = 10.0
    penalty_layers: tuple[str, ...] | None = _PENALTY_DEFAULTS.layers
    penalty_normalization: str = _PENALTY_DEFAULTS.normalization
    penalty_norm: str = _PENALTY_DEFAULTS.norm
    penalty_layer_weights: tuple[tuple[str, float], ...] | None = _PENALTY_DEFAULTS.layer_weights
    penalty_every: int = _PENALTY_DEFAULTS.every
    penalty_approx: str = _PENALTY_DEFAULTS.approx
    penalty_fd_step: float = _PENALTY_DEFAULTS.fd_step
    seed: int = 0
    dtype: str = "float32"
    cpu_devices: int | None = None
    conv_impl: str = "auto"
    steps_per_dispatch: int | str = "auto"
    workdir: str | None = None
    eval_every: int | None = None
    eval_attacks: tuple[str, ...] | None = None
    eval_eps: tuple[float, ...] = DEFAULT_EPS
    eval_pgd_steps: int = DEFAULT_PGD_STEPS
    eval_pgd_step_ratio: float = DEFAULT_PGD_STEP_RATIO
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    tensorboard: bool = False
    quiet: bool = False
    debug: bool = False

    def __post_init__(self):
        if self.lr is None and self.optimizer in DEFAULT_LR:
            object.__setattr__(self, "lr", DEFAULT_LR[self.optimizer])
        if self.model_args is not None:  # canonical JSON text: equivalent spellings are one run
            object.__setattr__(self, "model_args", _canonical_args(self.model_args))
        if isinstance(self.augment, str):
            object.__setattr__(self, "augment", _augment(self.augment))
        for key in ("penalty_layers", "penalty_layer_weights", "eval_attacks", "eval_eps",
                    "augment"):  # lists -> tuples
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, key, tuple(tuple(v) if isinstance(v, list) else v for v in value))

    def penalty_options(self) -> PenaltyOptions:
        """The penalty's options (all but its weight): the ``penalty_*`` fields as ``PenaltyOptions``."""
        return PenaltyOptions(**{f.name: getattr(self, PENALTY_PREFIX + f.name)
                                 for f in dataclasses.fields(PenaltyOptions)})

    def model_spec(self):
        """``agp_app.model_spec.ModelSpec`` of ``model`` and ``model_args``; ``UsageError`` if malformed."""
        try:
            return parse_model_spec(self.model, self.model_args)
        except ValueError as error:
            raise UsageError(str(error)) from None

    def storage_dtype(self) -> str:
        """The dtype of the data, the master weights and the optimizer state (float32 for bfloat16)."""
        return "float32" if self.dtype == "bfloat16" else self.dtype

    def attacks(self) -> tuple[Attack, ...]:
        """Every (attack, eps) pair to evaluate (empty without ``eval_attacks``); ``UsageError`` if any
        ``eval_*`` option is invalid, even when no attack is chosen."""
        try:
            return attack_grid(self.eval_attacks or (), self.eval_eps, self.eval_pgd_steps,
                               self.eval_pgd_step_ratio)
        except AttackOptionError as error:
            raise UsageError(f"{_flag(EVAL_PREFIX + error.field)} must be {error.expected}, "
                             f"got {error.value!r}") from None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {k: _lists(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_json``; unknown keys are a ``UsageError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise UsageError(f"config has unknown field(s) {unknown}; expected a subset of {sorted(names)}")
        values = dict(record)
        if values.get("synthetic_shape") is not None:
            values["synthetic_shape"] = tuple(values["synthetic_shape"])
        return cls(**values)


def _canonical_args(text: str) -> str | None:
    """``--model-args`` as canonical JSON (sorted keys, no spaces); ``None`` for ``{}``; text that is
    not a JSON object is kept as given (``model_spec`` reports it)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text
    if value == {}:
        return None
    return json.dumps(value, sort_keys=True, separators=(",", ":")) if isinstance(value, dict) else text


def _augment(text: str) -> tuple[str, ...]:
    try:
        return parse_augment(text)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, tuple) else value


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Number of optimizer steps the run ends at."""
    if config.steps is not None:
        return config.steps
    total = (config.epochs if config.epochs is not None else DEFAULT_EPOCHS) * steps_per_epoch
    _require(total <= MAX_INT, f"--epochs {config.epochs} is {total} steps of {steps_per_epoch}, more than "
                               f"the {MAX_INT} a run can count; ask for fewer --epochs")
    return total


#: Largest step count, seed or period a run accepts: the step counter is a 32-bit integer.
MAX_INT = 2**31 - 1
#: Most JAX CPU devices ``--cpu-devices`` asks for (far above any core count it is meant for).
MAX_CPU_DEVICES = 1024
#: Integer fields checked against ``MAX_INT`` (the ``None`` ones, when set).
_BOUNDED_INTS = ("epochs", "steps", "eval_every", "checkpoint_every", "batch_size", "keep_checkpoints",
                 "seed", "penalty_every")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def validate_config(config: TrainConfig, capture_names: Sequence[str] | None = None) -> TrainConfig:
    """Check every field that can be checked without the data; raise ``UsageError``.

    ``capture_names`` (the model's capture points) enables the check of
    ``penalty_layers``. Returns ``config`` unchanged.
    """
    _require(config.dataset in DATASETS, f"--dataset must be one of {list(DATASETS)}, got {config.dataset!r}")
    _require(config.optimizer in OPTIMIZERS,
             f"--optimizer must be one of {list(OPTIMIZERS)}, got {config.optimizer!r}")
    _require(config.dtype in DTYPES, f"--dtype must be one of {list(DTYPES)}, got {config.dtype!r}")
    _require(config.init in INITS, f"--init must be one of {list(INITS)}, got {config.init!r}")
    _require(config.lr_schedule in SCHEDULES,
             f"--lr-schedule must be one of {list(SCHEDULES)}, got {config.lr_schedule!r}")
    _require(config.weight_decay_form in WEIGHT_DECAY_FORMS,
             f"--weight-decay-form must be one of {list(WEIGHT_DECAY_FORMS)}, "
             f"got {config.weight_decay_form!r}")
    _require(math.isfinite(config.weight_decay) and config.weight_decay >= 0,
             f"--weight-decay must be a finite number >= 0, got {config.weight_decay}")
    _require(0 <= config.warmup_steps <= MAX_INT, f"--warmup-steps must be >= 0, got {config.warmup_steps}")
    _augment(",".join(config.augment))
    spec = config.model_spec()
    _require(config.init == "seeded" or spec.is_builtin,
             f"--init shared draws the weights of the built-in models ({', '.join(BUILTIN_MODELS)}); "
             f"{config.model} is yours: use --init seeded")
    _require(config.conv_impl in CONV_IMPLS,
             f"--conv-impl must be one of {list(CONV_IMPLS)}, got {config.conv_impl!r}")
    _require(config.epochs is None or config.steps is None,
             f"give --epochs or --steps, not both (got --epochs {config.epochs} --steps {config.steps})")
    for name in ("epochs", "steps", "eval_every", "checkpoint_every"):
        value = getattr(config, name)
        _require(value is None or value >= 1, f"{_flag(name)} must be >= 1, got {value}")
    _require(config.batch_size >= 1, f"--batch-size must be >= 1, got {config.batch_size}")
    _require(config.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {config.keep_checkpoints}")
    _require(math.isfinite(config.lr) and config.lr > 0, f"--lr must be a finite number > 0, got {config.lr}")
    _require(math.isfinite(config.penalty_weight) and config.penalty_weight >= 0,
             f"--penalty-weight must be a finite number >= 0, got {config.penalty_weight}")
    try:
        options = config.penalty_options()
    except PenaltyOptionError as error:
        raise UsageError(f"{_flag(PENALTY_PREFIX + error.field)} must be {error.expected}, "
                         f"got {error.value!r}") from None
    except ValueError as error:  # duplicates
        raise UsageError(f"--penalty-layers: {error}") from None
    _require(config.seed >= 0, f"--seed must be >= 0, got {config.seed}")
    for name in _BOUNDED_INTS:
        value = getattr(config, name)
        _require(value is None or value <= MAX_INT, f"{_flag(name)} must be at most {MAX_INT}, got {value}")
    _require(config.cpu_devices is None or 1 <= config.cpu_devices <= MAX_CPU_DEVICES,
             f"--cpu-devices must be 'auto' or between 1 and {MAX_CPU_DEVICES}, got {config.cpu_devices}")
    _require(config.steps_per_dispatch == "auto" or (type(config.steps_per_dispatch) is int
                                                     and 1 <= config.steps_per_dispatch <= MAX_INT),
             f"--steps-per-dispatch must be 'auto' or an integer >= 1, got {config.steps_per_dispatch!r}")
    _require(config.num_classes is None or 2 <= config.num_classes <= MAX_CLASSES,
             f"--num-classes must be between 2 and {MAX_CLASSES}, got {config.num_classes}")
    _require(config.workdir is None or bool(str(config.workdir).strip()),
             "--workdir is empty; name a folder for the run (new, or one of an earlier run to resume)")
    config.attacks()  # UsageError naming the --eval-* flag
    _require(config.dataset != "npz" or config.data_dir is not None,
             "--dataset npz needs --data-dir naming an .npz file (or a folder holding one)")
    _require(config.dataset != "cifar10" or config.data_dir is not None,
             "--dataset cifar10 needs --data-dir naming the CIFAR-10 folder (binary or python release, "
             "from https://www.cs.toronto.edu/~kriz/cifar.html, unpacked with tar xzf)")
    _require(len(config.synthetic_shape) == 4 and all(d >= 1 for d in config.synthetic_shape),
             f"--synthetic-shape must be four positive sizes N,H,W,C, got {config.synthetic_shape}")
    if capture_names is not None:
        weighted = options.layers or tuple(capture_names)
        unknown = [name for name, _ in options.layer_weights or () if name not in weighted]
        _require(not unknown, f"--penalty-layer-weights names {unknown}, which are not penalised "
                              f"(penalised: {list(weighted)})")
    return config


def trajectory_fields(config: TrainConfig, capture_points: Sequence[str] | None = None,
                      num_classes: int | None = None) -> dict[str, Any]:
    """The fields that define a run's trajectory (all but ``RESUMABLE_FIELDS``), normalised so that
    configs meaning the same run compare equal.

    ``penalty_layers``: a set (order does not matter), ``None`` (every capture point) made the
    model's ``capture_points`` when known; ``penalty_layer_weights``: a set of pairs, ``None`` when
    every weight is 1 (a missing layer weighs 1); ``num_classes``: ``None`` made the data's
    ``num_classes`` when known.
    """
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name not in RESUMABLE_FIELDS}
    layers = values["penalty_layers"]
    if layers is None and capture_points is not None:
        layers = tuple(capture_points)
    values["penalty_layers"] = None if layers is None else frozenset(layers)
    weights = values["penalty_layer_weights"]
    if weights is not None:
        values["penalty_layer_weights"] = None if all(w == 1 for _, w in weights) else frozenset(weights)
    if values["num_classes"] is None:
        values["num_classes"] = num_classes
    if values["lr_schedule"] != "constant":  # the schedule spans the run: its length is part of it
        values["length"] = (config.epochs, config.steps)
    return values


def check_resumable(saved: TrainConfig, current: TrainConfig, capture_points: Sequence[str] | None = None,
                    num_classes: tuple[int | None, int | None] = (None, None)) -> None:
    """Refuse to resume a run whose trajectory-defining fields differ from the current flags.

    Compared after ``trajectory_fields``' normalisation with the model's ``capture_points`` and the
    (saved, current) data's ``num_classes``, so equivalent spellings of one run resume.
    """
    then = trajectory_fields(saved, capture_points, num_classes[0])
    now = trajectory_fields(current, capture_points, num_classes[1])
    diffs = [f"{name}: saved {then[name]!r}, now {now[name]!r}" if name == "length" else
             f"{name}: saved {getattr(saved, name)!r}, now {getattr(current, name)!r}"
             for name in then if then.get(name) != now.get(name)]
    if diffs:
        raise UsageError("the workdir holds a run with a different config (" + "; ".join(diffs)
                         + "); use another --workdir or the same flags")


def default_workdir(config: TrainConfig, framework: str) -> str:
    """``runs/<framework>_<dataset>_<model>``, plus ``_<hash>`` (8 hex digits of sha256) of the
    trajectory-defining flags that differ from their defaults, when any does: runs of different
    configs get different folders; a longer run (--epochs, --steps) of the same config resumes."""
    model = config.model.rsplit(":", 1)[-1].lower()
    name = f"runs/{framework}_{config.dataset}_{model}"
    base = trajectory_fields(TrainConfig(dataset=config.dataset, model=config.model))
    changed = {k: v for k, v in trajectory_fields(config).items() if base.get(k) != v}
    for k in ("dataset", "model"):
        changed.pop(k, None)
    if changed:
        text = json.dumps({k: sorted(map(str, v)) if isinstance(v, frozenset) else v
                           for k, v in sorted(changed.items())}, sort_keys=True, default=str)
        name += "_" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return name
