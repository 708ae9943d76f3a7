"""``python -m parity_tests.verify``: every mistake a user can make is one ``error:`` line and exit 2.

Exit 1 means "the models disagree" and nothing else; a usage error never
shows a traceback (``--debug`` adds it). The models below exist only to be
wrong: one raising in ``__init__``, one without parameters, one whose output
is a scalar; broken user modules are written to ``tmp_path``.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from parity_tests.verify import main

LENET = ["examples.lenet_torch:LeNet", "examples.lenet_flax:LeNet"]
LENET_INPUT = ["--input-shape", "2,1,28,28", "--captures", "tanh1=act1"]


class RaisesInInit(nn.Module):
    def __init__(self):
        super().__init__()
        raise RuntimeError("weights file not found")


class NoParameters(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class ScalarOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * x.sum()


def run_cli(argv, capsys) -> str:
    """``main(argv)``; asserts exit 2 and exactly one ``error:`` line on stderr; returns that line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.mark.parametrize("torch_model, message", [
    (f"{__name__}:RaisesInInit", "RaisesInInit() raised RuntimeError: weights file not found"),
    (f"{__name__}:NoParameters", "NoParameters has no parameters"),
    (f"{__name__}:ScalarOutput", "output must hold logits of shape (B, classes) = (2, K)"),
], ids=["init-raises", "no-parameters", "scalar-output"])
def test_a_model_that_cannot_be_verified_is_one_line(torch_model, message, capsys):
    assert message in run_cli([torch_model, LENET[1], *LENET_INPUT], capsys)


@pytest.mark.parametrize("source, message", [
    ("def broken(:\n", "importing module 'user_model_syntax' failed: SyntaxError"),
    ("import no_such_dependency_xyz\n", "importing module 'user_model_import' failed: No module named "
                                         "'no_such_dependency_xyz'"),
], ids=["syntax-error", "import-error"])
def test_a_broken_user_module_is_one_line(source, message, tmp_path, monkeypatch, capsys):
    name = "user_model_syntax" if "broken" in source else "user_model_import"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert message in run_cli([f"{name}:Net", LENET[1], *LENET_INPUT], capsys)


@pytest.mark.parametrize("flags, message", [
    (["--num-classes", "11"], "--num-classes 11 is larger than the model's 10 logits"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**32), got -1"),
    (["--seed", str(10**23)], "--seed must be an integer in [0, 2**32)"),
    (["--lr", "nan"], "--lr must be a positive finite number"),
    (["--penalty-weight", "inf"], "--penalty-weight must be a finite number >= 0"),
    (["--steps", "100000"], "--steps must be in [0, 10000]"),
    (["--captures", "a=act1,a=act2"], "--captures: the name 'a' is given twice ('act1' and 'act2')"),
    (["--captures", "t=act1@no/such"], "the Flax path 'no/such' given after '@' names no module"),
    (["--input-shape", "100000000,100000000"], "--input-shape 100000000,100000000: 1e+16 elements"),
    (["--input-dtype", "int64"], "--input-dtype int32/int64 needs --input-range LO,HI"),
    (["--input-range", "1,0"], "--input-range: expected two numbers LO,HI with LO < HI"),
], ids=["num-classes", "seed-negative", "seed-huge", "lr-nan", "weight-inf", "steps", "captures-twice",
        "flax-path", "shape-huge", "int-no-range", "range"])
def test_bad_flags_are_one_line_naming_the_flag(flags, message, capsys):
    argv = [*LENET, *LENET_INPUT]
    for flag, value in zip(flags[::2], flags[1::2], strict=True):  # a given flag replaces the default
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert message in run_cli(argv, capsys)


def test_an_npz_whose_header_claims_a_huge_array_is_refused_before_reading(tmp_path, capsys):
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False,
                                                 "shape": (100000, 1000, 1000, 3)})
    err = run_cli([*LENET, "--inputs", str(path), "--captures", "tanh1=act1"], capsys)
    assert f"--inputs {path}: 3e+11 elements, more than the verifier takes" in err


@pytest.mark.parametrize("content, message", [
    (b"not a zip file", "cannot read it as an .npz file"),
    (None, "cannot read it as an .npz file"),
], ids=["garbage", "missing"])
def test_an_unreadable_inputs_file_is_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "inputs.npz"
    if content is not None:
        path.write_bytes(content)
    assert message in run_cli([*LENET, "--inputs", str(path), "--captures", "tanh1=act1"], capsys)
