"""The command line of both training CLIs: the flag parser that builds a ``TrainConfig``.

``python -m jax_impl.train`` and ``python -m torch_ref.train`` share this parser, so one recipe
runs unchanged in both frameworks. Every ``TrainConfig`` field (agp_app/config.py) has one flag;
the ``--penalty-*`` flags are made from ``PenaltyOptions`` (agp_common/penalty_spec.py), their one
definition. The argparse type functions here turn a malformed value into argparse's one-line error
(exit 2); the checks that need the whole config are ``agp_app.config.validate_config``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from agp_app.augment import parse_augment
from agp_app.config import (
    CONV_IMPLS,
    DATASETS,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DTYPES,
    INITS,
    MOMENTUM,
    OPTIMIZERS,
    PENALTY_PREFIX,
    WEIGHT_DECAY_FORMS,
    TrainConfig,
    _flag,
    default_workdir,
)
from agp_app.dataset import MAX_CLASSES
from agp_app.schedules import SCHEDULES
from agp_common.attack_spec import ATTACKS
from agp_common.penalty_spec import PenaltyOptions


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _cpu_devices(text: str) -> int | None:
    return None if text.strip() == "auto" else _int(text)


def _steps_per_dispatch(text: str) -> int | str:
    return "auto" if text.strip() == "auto" else _int(text)


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,H,W,C such as 512,32,32,3, got {text!r}") from None
    if len(dims) != 4:
        raise argparse.ArgumentTypeError(f"expected four sizes N,H,W,C, got {text!r}")
    return dims  # type: ignore[return-value]


def _floats(text: str) -> tuple[float, ...]:
    values = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        try:
            values.append(float(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers such as 0.05,0.1, got {text!r}") from None
    return tuple(values)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _layers(text: str) -> tuple[str, ...] | None:
    return None if text.strip() == "all" else _names(text)


def _layer_weights(text: str) -> tuple[tuple[str, float], ...]:
    pairs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, sep, weight = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(
                f"expected NAME=WEIGHT pairs such as relu1=1,relu2=0.5, got {text!r}")
        pairs.append((name.strip(), _float(weight)))
    return tuple(pairs)


#: How each ``PenaltyOptions`` field is read from the command line (the rest of its flag is its metadata).
_PENALTY_PARSERS = {"layers": _layers, "layer_weights": _layer_weights, "fd_step": _float, "every": _int}


class OneLineErrorParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line (``prog: error: ...; see --help``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def _default(value: Any) -> str:
    """`` (default: X)`` for the help text."""
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return f" (default: {value})"


def _add_penalty_flags(group) -> None:
    """One ``--penalty-<name>`` flag per ``PenaltyOptions`` field, from its metadata."""
    for field in dataclasses.fields(PenaltyOptions):
        meta = field.metadata
        choices = meta["choices"]
        default = "" if field.default is None else _default(field.default)
        kwargs = {"choices": choices} if choices else {"type": _PENALTY_PARSERS[field.name]}
        group.add_argument(_flag(PENALTY_PREFIX + field.name), default=field.default, metavar=meta["metavar"],
                           help=meta["help"] + default, **kwargs)


def build_parser(prog: str, framework: str) -> argparse.ArgumentParser:
    """The flags of ``python -m {jax_impl,torch_ref}.train``, in groups; each default stated once."""
    d = TrainConfig()
    p = OneLineErrorParser(
        prog=prog,
        description=f"Train a network (the answer's CNN, a ResNet-18 or your own) with the activation "
                    f"gradient penalty ({framework}): "
                    "total = loss + w * sum_l ||d loss / d a_l||^2. Running the same command on the "
                    "same --workdir resumes from its newest checkpoint.",
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                      help="bundled scikit-learn digits (8x8 resized to 32x32, 1 channel), CIFAR-10 files, "
                           "your .npz, or random images with learnable labels" + _default(d.dataset))
    data.add_argument("--data-dir", default=None,
                      help="CIFAR-10 folder (binary or python release), or the .npz file / folder holding "
                           "one; needed by --dataset cifar10 and npz, unused otherwise")
    data.add_argument("--num-classes", type=_int, default=None, metavar="K",
                      help=f"number of classes; every label must be in [0, K). Not set: 10 for digits, "
                           f"cifar10 and synthetic, max(label) + 1 for npz (refused above {MAX_CLASSES})")
    data.add_argument("--synthetic-shape", type=_shape, default=d.synthetic_shape, metavar="N,H,W,C",
                      help="size of --dataset synthetic: training examples N (plus N/5 test ones), "
                           "height, width, channels" + _default(d.synthetic_shape))

    model = p.add_argument_group("model and penalty", "the network; the penalty's options "
                                 "(see PenaltyOptions and docs/options.md)")
    user_kind = "Flax module (linen)" if framework == "jax" else "torch.nn.Module"
    model.add_argument("--model", default=d.model, metavar="cnn|resnet18|pkg.module:Name",
                       help="cnn: the answer's CNN; resnet18: the CIFAR-style ResNet-18 (BatchNorm; same "
                            f"layer names in both CLIs); pkg.module:Name: your {user_kind} class or factory, "
                            "imported from the current folder or sys.path" + _default(d.model))
    model.add_argument("--model-args", default=None, metavar="JSON",
                       help="keyword arguments of the model as a JSON object, e.g. '{\"width\": 16}'")
    model.add_argument("--init", choices=INITS, default=d.init,
                       help="seeded: each framework's own initialisation from --seed; shared: the same "
                            "framework-free draw in both CLIs (built-in models), so that a JAX and a "
                            "PyTorch run start from identical weights" + _default(d.init))
    model.add_argument("--penalty-weight", type=_float, default=d.penalty_weight, metavar="W",
                       help="weight w of the penalty; 0 trains without it" + _default(d.penalty_weight))
    _add_penalty_flags(model)
    for action in model._group_actions:  # --penalty-layers also takes module paths
        if action.dest == "penalty_layers":
            action.help += (". Any name that is not one of the model's capture() points is a module path "
                            "(layer1.0 or layer1/0; list them with jax_impl.capture_points / "
                            "torch_ref.capture_points); resnet18 and most own models have no capture() "
                            "points and need paths")

    optim = p.add_argument_group("optimisation")
    length = optim.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_int, default=None,
                        help=f"passes over the training data; not set: {DEFAULT_EPOCHS}, or --steps")
    length.add_argument("--steps", type=_int, default=None,
                        help="optimizer steps, instead of --epochs; not set: --epochs decides")
    optim.add_argument("--batch-size", type=_int, default=d.batch_size,
                       help="global batch size, over all devices" + _default(d.batch_size))
    optim.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                       help=f"plain SGD as in the answer, SGD with momentum {MOMENTUM}, or Adam"
                            + _default(d.optimizer))
    optim.add_argument("--lr", type=_float, default=None,
                       help="constant learning rate; not set: the optimizer's default, "
                            + ", ".join(f"{k} {v}" for k, v in DEFAULT_LR.items()))
    optim.add_argument("--lr-schedule", choices=SCHEDULES, default=d.lr_schedule,
                       help="learning rate per update: constant, cosine decay to 0, or step (x0.1 at 50%% "
                            "and 75%% of the steps); after --warmup-steps of linear warm-up from 0"
                            + _default(d.lr_schedule))
    optim.add_argument("--warmup-steps", type=_int, default=d.warmup_steps, metavar="N",
                       help="updates of linear learning-rate warm-up" + _default(d.warmup_steps))
    optim.add_argument("--weight-decay", type=_float, default=d.weight_decay, metavar="WD",
                       help="weight decay of every parameter" + _default(d.weight_decay))
    optim.add_argument("--weight-decay-form", choices=WEIGHT_DECAY_FORMS, default=d.weight_decay_form,
                       help="coupled: WD*p added to the gradient (torch.optim.SGD/Adam weight_decay, the "
                            "CIFAR recipes' 5e-4); decoupled: p -= lr*WD*p beside the step (SGDW, AdamW)"
                            + _default(d.weight_decay_form))
    optim.add_argument("--augment", type=_augment_flag, default=d.augment, metavar="crop,flip",
                       help="training-data augmentation: random crop (4-pixel zero padding) and/or "
                            "horizontal flip, drawn from (--seed, step): a resumed run draws the same; "
                            "none: off (default: none)")
    optim.add_argument("--seed", type=_int, default=d.seed,
                       help="seed of the initial weights and the batch order" + _default(d.seed))

    run = p.add_argument_group("run folder", "config.json, metrics.jsonl, checkpoints and plots")
    run.add_argument("--workdir", default=None,
                     help=f"run folder; not set: runs/{framework}_DATASET_MODEL, plus _HASH of the flags "
                          "that change the training when any differs from its default (default_workdir)")
    run.add_argument("--eval-every", type=_int, default=None,
                     help="evaluate on the test split every N steps; not set: after each epoch and at "
                          "the end")
    run.add_argument("--checkpoint-every", type=_int, default=None,
                     help="checkpoint every N steps; not set: after each epoch and at the end")
    run.add_argument("--keep-checkpoints", type=_int, default=d.keep_checkpoints,
                     help="how many of the newest checkpoints to keep" + _default(d.keep_checkpoints))
    run.add_argument("--tensorboard", action="store_true",
                     help="also write TensorBoard event files to WORKDIR/tensorboard (needs tensorboardX)")
    run.add_argument("--quiet", action="store_true",
                     help="plain periodic log lines instead of a progress bar")
    run.add_argument("--debug", action="store_true", help="show the full traceback of errors")

    attack = p.add_argument_group(
        "adversarial evaluation", "accuracy on the test split under L-infinity attacks, written to "
        "metrics.jsonl as eval_accuracy/ATTACK@EPS at every evaluation (agp_common/attack_spec.py)")
    attack.add_argument("--eval-attacks", type=_names, default=d.eval_attacks, metavar="NAMES",
                        help=f"comma-separated attacks from {','.join(ATTACKS)}; not set: no attack")
    attack.add_argument("--eval-eps", type=_floats, default=d.eval_eps, metavar="EPS",
                        help="comma-separated L-infinity radii of every attack, in units of the scaled "
                             "data ([0, 1] for digits, CIFAR-10, synthetic)" + _default(d.eval_eps))
    attack.add_argument("--eval-pgd-steps", type=_int, default=d.eval_pgd_steps, metavar="K",
                        help="PGD's steps (no random start)" + _default(d.eval_pgd_steps))
    attack.add_argument("--eval-pgd-step-ratio", type=_float, default=d.eval_pgd_step_ratio, metavar="R",
                        help="PGD's step size as a fraction of eps: alpha = R * eps"
                             + _default(d.eval_pgd_step_ratio))

    devices = p.add_argument_group(
        "devices and precision",
        "JAX trains data-parallel on every device it sees (choose with JAX_PLATFORMS=cpu|cuda|tpu or "
        "CUDA_VISIBLE_DEVICES; several hosts: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
        "JAX_PROCESS_ID); PyTorch uses the CPU")
    devices.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                         help="floating-point type of data and weights; bfloat16: mixed precision (float32 "
                              "data, weights and optimizer state; forward, penalty and gradients in "
                              "bfloat16; evaluation in float32)" + _default(d.dtype))
    devices.add_argument("--cpu-devices", type=_cpu_devices, default=None, metavar="N|auto",
                         help="JAX on CPU: split the cores into N devices and the batch over them "
                              "(faster for large batches: XLA's CPU convolutions use several cores "
                              "poorly); not set or auto: one device per 64 examples, at most one per core, "
                              "and one with --conv-impl onednn (unused by PyTorch and on GPU/TPU)")
    devices.add_argument("--conv-impl", choices=CONV_IMPLS, default=d.conv_impl,
                         help="JAX's convolution algorithm: auto (onednn on CPU where built, else "
                              "canonical; xla on GPU/TPU), canonical, xla, im2col, or onednn (CPU, float32: "
                              "oneDNN's kernels, the ones PyTorch uses; built by python -m "
                              "jax_impl.onednn_conv build, else canonical with a warning; unused by "
                              "PyTorch)" + _default(d.conv_impl))
    if framework == "jax":  # a JAX-only flag: the PyTorch CLI refuses it
        devices.add_argument("--steps-per-dispatch", type=_steps_per_dispatch, default=d.steps_per_dispatch,
                             metavar="N|auto",
                             help="JAX: run N train steps in one compiled call (lax.scan; the same numbers "
                                  "as N single steps, every step still logged), fewer launches and "
                                  "allocations per step; auto: 8. Batches prepared on "
                                  "the host (--augment, several processes, data too large for the devices) "
                                  "run one step per call" + _default(d.steps_per_dispatch))
    return p


def parse_config(argv: Sequence[str] | None, prog: str, framework: str) -> TrainConfig:
    """Parse flags into a ``TrainConfig`` (argparse exits 2 on malformed flags)."""
    args = build_parser(prog, framework).parse_args(argv)
    values = vars(args)
    config = TrainConfig(**values)
    if config.workdir is None:
        config = dataclasses.replace(config, workdir=default_workdir(config, framework))
    return config


def _augment_flag(text: str) -> tuple[str, ...]:
    try:
        return parse_augment(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
