"""``python -m parity_tests.verify``: verify a PyTorch model against its Flax twin from the command line.

Each model is ``package.module:Name``: a class (built with ``--torch-kwargs`` /
``--flax-kwargs``) or a function returning a model (called with them), e.g. a
``resnet18``-style factory or one that builds a Hugging Face model from a
config. Inputs: ``--input-shape`` with random values (``--input-dtype``,
``--input-range``), or ``--inputs file.npz`` (its arrays by name as keyword
inputs, or in file order with ``--inputs-positional``). Labels are uniform in
``[0, --num-classes)``; ``--seed`` seeds the weights, the inputs and the labels::

    python -m parity_tests.verify examples.lenet_torch:LeNet examples.lenet_flax:LeNet \\
        --input-shape 8,1,28,28 --num-classes 10 --captures tanh1=act1,tanh2=act2
    python -m parity_tests.verify examples.hf_bert:torch_model examples.hf_bert:flax_model \\
        --input-shape 2,8 --input-dtype int64 --input-range 1,50 --num-classes 3 \\
        --captures bert.encoder.layer.0,bert.encoder.layer.1

Exit status 0 when every row passes, 1 when one does not (the models
disagree), 2 for a usage error: one ``error:`` line (``--debug`` adds the
traceback), never a traceback alone.
"""

from __future__ import annotations

import argparse
import math
import sys
import zipfile
from collections.abc import Sequence
from typing import Any

import flax.linen as linen
import numpy as np
import torch
from torch import nn

from agp_app.errors import UsageError, report_error
from agp_app.flags import OneLineErrorParser
from agp_app.model_spec import import_object
from agp_app.model_spec import parse_json_object as json_object
from parity_tests.harness import DTYPES, single_threaded_torch
from parity_tests.verifier.flax_twin import is_pretrained_wrapper
from parity_tests.verifier.inputs import FLAX_LAYOUTS
from parity_tests.verifier.pair import (
    DEFAULT_LR,
    DEFAULT_PENALTY_WEIGHT,
    DEFAULT_STEPS,
    LabelsOutOfRange,
    init_flax_variables,
    verify_pair,
)
from parity_tests.verifier.rows import Row, first_line, print_report

#: Inputs larger than this (elements, all arrays together) are refused: 1e8 float64 values are 800 MB.
MAX_INPUT_ELEMENTS = 10**8
MAX_STEPS = 10_000
INPUT_DTYPES = ("float", "int32", "int64")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m parity_tests.verify",
        description="Verify a PyTorch model against its Flax twin: weights, activation gradient "
                    "penalty, every gradient, an SGD run.")
    parser.add_argument("torch_model",
                        help="PyTorch nn.Module class or factory function, 'package.module:Name'")
    parser.add_argument("flax_model", help="Flax linen.Module (or Hugging Face Flax model) class or factory "
                                           "function, 'package.module:Name'")
    parser.add_argument("--input-shape",
                        help="random input of this shape in the PyTorch layout, e.g. 8,3,32,32")
    parser.add_argument("--input-dtype", choices=INPUT_DTYPES, default="float",
                        help="float (the run's --dtype, default) or integer inputs such as token ids")
    parser.add_argument("--input-range", help="LO,HI: random inputs in [LO, HI) (default 0,1 for float; "
                                              "required for integer inputs, e.g. 0,VOCAB)")
    parser.add_argument("--inputs", help=".npz file of inputs: its arrays by name as keyword inputs "
                                         "(input_ids=..., attention_mask=...)")
    parser.add_argument("--inputs-positional", action="store_true",
                        help="pass the --inputs arrays positionally, in file order")
    parser.add_argument("--num-classes", type=int, default=10,
                        help="labels in [0, N), the first N-1 (default 10); at most the model's logits")
    parser.add_argument("--captures", required=True,
                        help="activations to penalise, comma-separated: a PyTorch module path "
                             "(bert.encoder.layer.0; Flax path: '.' -> '/'), or name=torch.path[:k] (a Flax "
                             "capture() point 'name', else the PyTorch path), or name=torch.path@flax/path")
    parser.add_argument("--torch-kwargs", help="JSON object of PyTorch constructor/factory arguments")
    parser.add_argument("--flax-kwargs", help="JSON object of Flax constructor/factory arguments")
    parser.add_argument("--flax-apply-kwargs",
                        help='JSON object of flax apply keyword arguments, e.g. \'{"train": true}\'')
    parser.add_argument("--name-map", help="JSON object: PyTorch module path -> Flax path, for the converter")
    parser.add_argument("--penalty-weight", type=float, default=DEFAULT_PENALTY_WEIGHT,
                        help=f"w (default {DEFAULT_PENALTY_WEIGHT:g})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"SGD steps compared (default {DEFAULT_STEPS})")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help=f"SGD learning rate (default {DEFAULT_LR})")
    parser.add_argument("--dtype", choices=DTYPES, default="float64")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the weights, x and the labels, in [0, 2**32)")
    parser.add_argument("--train", action="store_true",
                        help="BatchNorm in train mode (PyTorch BatchNorm .train(), Flax mutable batch_stats; "
                             "give the Flax flag with --flax-apply-kwargs)")
    parser.add_argument("--init", choices=("torch", "flax"), default="torch",
                        help="which framework initialises the weights (default torch)")
    parser.add_argument("--flax-layout", choices=FLAX_LAYOUTS, default="channels_last",
                        help="channels_last: rank-4 tensors are NCHW in PyTorch, NHWC in Flax (default)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the table and a verdict line; exit 0 if every row passes, 1 if not, 2 on usage errors."""
    args = build_parser().parse_args(argv)
    try:
        rows = run(args)
    except LabelsOutOfRange as e:
        error = UsageError(f"--num-classes {args.num_classes} is larger than the model's {e.classes} logits; "
                           f"pass --num-classes {e.classes} or less")
        return report_error(error, args.debug)
    except (UsageError, ValueError) as e:
        return report_error(UsageError(str(e)) if isinstance(e, ValueError) else e, args.debug)
    return print_report(rows)


def run(args: argparse.Namespace) -> list[Row]:
    """The verification ``args`` ask for (flags checked first, each error naming its flag)."""
    _check_numbers(args)
    captures = parse_captures_flag(args.captures)
    torch_kwargs = parse_json_object(args.torch_kwargs, "--torch-kwargs")
    flax_kwargs = parse_json_object(args.flax_kwargs, "--flax-kwargs")
    apply_kwargs = parse_json_object(args.flax_apply_kwargs, "--flax-apply-kwargs")
    name_map = parse_json_object(args.name_map, "--name-map") or None
    rng = np.random.default_rng(args.seed)
    x = read_inputs(args, rng)
    torch_factory = load_object(args.torch_model, "PyTorch")
    flax_factory = load_object(args.flax_model, "Flax")
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        torch_module = build(torch_factory, torch_kwargs, "PyTorch", "--torch-kwargs")
    flax_module = build(flax_factory, flax_kwargs, "Flax", "--flax-kwargs")
    first = x[0] if isinstance(x, tuple) else next(iter(x.values())) if isinstance(x, dict) else x
    y = rng.integers(0, args.num_classes, first.shape[0] if first.ndim else 1)
    y[0] = args.num_classes - 1  # so that a --num-classes above the model's logits is an error, not luck
    flax_variables = None
    if args.init == "flax":
        flax_variables = init_flax_variables(flax_module, x, seed=args.seed, dtype=args.dtype,
                                             flax_layout=args.flax_layout, flax_apply_kwargs=apply_kwargs)
    with single_threaded_torch():
        return verify_pair(
            torch_module, flax_module, x, y, capture_modules=captures, penalty_weight=args.penalty_weight,
            steps=args.steps, lr=args.lr, dtype=args.dtype, train=args.train, flax_apply_kwargs=apply_kwargs,
            flax_layout=args.flax_layout, flax_variables=flax_variables, name_map=name_map)


# ------------------------------------------------------------------------------------ flags


def _check_numbers(args: argparse.Namespace) -> None:
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be an integer in [0, 2**32), got {args.seed}")
    if args.num_classes < 1:
        raise UsageError(f"--num-classes must be >= 1, got {args.num_classes}")
    if not 0 <= args.steps <= MAX_STEPS:
        raise UsageError(f"--steps must be in [0, {MAX_STEPS}], got {args.steps}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive finite number, got {args.lr}")
    if not (math.isfinite(args.penalty_weight) and args.penalty_weight >= 0):
        raise UsageError(f"--penalty-weight must be a finite number >= 0, got {args.penalty_weight}")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,32,32"`` -> (8, 3, 32, 32); positive integers, at most ``MAX_INPUT_ELEMENTS`` elements."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise UsageError(f"--input-shape: expected positive integers 'B,C,H,W' (or 'B,D'), got {text!r}")
    check_size(math.prod(shape), f"--input-shape {text}")
    return shape


def check_size(elements: int, what: str) -> None:
    if elements > MAX_INPUT_ELEMENTS:
        raise UsageError(f"{what}: {elements:.3g} elements, more than the verifier takes "
                         f"({MAX_INPUT_ELEMENTS:.0e}); verify on a smaller batch")


def parse_range(text: str | None, integer: bool) -> tuple[float, float]:
    """``"0,50"`` -> (0, 50): LO < HI, finite (integers for integer inputs)."""
    if text is None:
        if integer:
            raise UsageError("--input-dtype int32/int64 needs --input-range LO,HI (e.g. 0,VOCAB for token "
                             "ids)")
        return 0.0, 1.0
    parts = text.split(",")
    try:
        lo, hi = (int(p) for p in parts) if integer else (float(p) for p in parts)
    except ValueError:
        lo = hi = None
    if lo is None or len(parts) != 2 or not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        kind = "integers" if integer else "numbers"
        raise UsageError(f"--input-range: expected two {kind} LO,HI with LO < HI, got {text!r}")
    if integer and not np.iinfo(np.int64).min <= lo < hi <= np.iinfo(np.int64).max:
        raise UsageError(f"--input-range: out of the int64 range, got {text!r}")
    return lo, hi


def read_inputs(args: argparse.Namespace, rng: np.random.Generator) -> Any:
    """The inputs the flags describe: random (``--input-shape``) or from ``--inputs`` (an .npz file)."""
    if (args.inputs is None) == (args.input_shape is None):
        raise UsageError("give the inputs either as --input-shape (random) or as --inputs file.npz, not "
                         f"{'both' if args.inputs else 'neither'}")
    if args.inputs is not None:
        if args.input_range is not None or args.input_dtype != "float":
            raise UsageError("--input-range and --input-dtype describe random inputs; --inputs reads them "
                             "from the file as they are")
        return load_npz(args.inputs, positional=args.inputs_positional)
    if args.inputs_positional:
        raise UsageError("--inputs-positional goes with --inputs file.npz")
    shape = parse_shape(args.input_shape)
    integer = args.input_dtype != "float"
    lo, hi = parse_range(args.input_range, integer)
    if integer:
        return rng.integers(lo, hi, shape, dtype=args.input_dtype)
    return (lo + (hi - lo) * rng.random(shape)).astype(args.dtype)


def load_npz(path: str, *, positional: bool) -> dict[str, np.ndarray] | tuple[np.ndarray, ...]:
    """The arrays of an ``.npz`` file by name (or in file order), sizes checked before anything is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if m.endswith(".npy")]
            total = 0
            for member in members:
                with archive.open(member) as f:
                    shape, dtype = _npy_header(f)
                if dtype.kind not in "biuf":
                    raise UsageError(f"--inputs {path}: array {member[:-4]!r} has dtype {dtype}; expected "
                                     "numbers")
                total += math.prod(shape)
        if not members:
            raise UsageError(f"--inputs {path}: the file holds no arrays")
        check_size(total, f"--inputs {path}")
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        raise UsageError(f"--inputs {path}: cannot read it as an .npz file of arrays ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return tuple(arrays.values()) if positional else arrays


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(shape), np.dtype(dtype)


def parse_captures_flag(text: str) -> dict[str, str]:
    """``"a=act1,bert.encoder.layer.0"`` -> ``{"a": "act1", "bert.encoder.layer.0": "bert.encoder.layer.0"}``.

    Raises ``UsageError`` for an empty name or spec and for a name given twice.
    """
    captures: dict[str, str] = {}
    for item in text.split(","):
        name, sep, spec = item.partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep:
            spec = name
        if not name or not spec:
            raise UsageError("--captures: expected 'torch.module.path' or 'name=torch.module.path[:k]"
                             f"[@flax/path]' items separated by commas, got {text!r}")
        if name in captures:
            raise UsageError(f"--captures: the name {name!r} is given twice ({captures[name]!r} and "
                             f"{spec!r}); each capture needs its own name")
        captures[name] = spec
    return captures


def parse_json_object(text: str | None, flag: str) -> dict:
    """``agp_app.model_spec.parse_json_object`` with its error as a ``UsageError``."""
    try:
        return json_object(text, flag, '{"features": 8}')
    except ValueError as e:
        raise UsageError(str(e)) from None


# ------------------------------------------------------------------------------------ models


def load_object(spec: str, what: str) -> Any:
    """``"package.module:Name"`` (``Name`` may be dotted) -> the object; any import failure is one line."""
    try:
        return import_object(spec, f"{what} model")
    except ValueError as e:
        raise UsageError(str(e)) from e


def build(factory: Any, kwargs: dict, what: str, flag: str) -> Any:
    """``factory(**kwargs)`` for a class or a function, checked to be a model of the framework ``what``."""
    wanted = _is_torch_model if what == "PyTorch" else _is_flax_model
    expected = "torch.nn.Module" if what == "PyTorch" else "flax.linen.Module (or a Hugging Face Flax model)"
    if isinstance(factory, type) and not _class_may_build(factory, what):
        raise UsageError(f"{what} model: expected a subclass of {expected} or a function returning one, "
                         f"got {factory!r}")
    if not callable(factory):
        raise UsageError(f"{what} model: expected a class or a function, got {factory!r}")
    name = getattr(factory, "__qualname__", repr(factory))
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise UsageError(f"{what} model {name}({_kwargs(kwargs)}): {e}; pass constructor arguments with "
                         f"{flag}") from e
    except Exception as e:  # the user's code raised while building the model
        raise UsageError(f"{what} model {name}({_kwargs(kwargs)}) raised {type(e).__name__}: "
                         f"{first_line(e)}") from e
    if not wanted(model):
        raise UsageError(f"{what} model: {name}({_kwargs(kwargs)}) returned {type(model).__name__}, "
                         f"expected a {expected}")
    return model


def _class_may_build(cls: type, what: str) -> bool:
    if what == "PyTorch":
        return issubclass(cls, nn.Module)
    return issubclass(cls, linen.Module) or hasattr(cls, "module")  # a Hugging Face Flax model class


def _is_torch_model(obj: Any) -> bool:
    return isinstance(obj, nn.Module)


def _is_flax_model(obj: Any) -> bool:
    return isinstance(obj, linen.Module) or is_pretrained_wrapper(obj)


def _kwargs(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


if __name__ == "__main__":
    sys.exit(main())
