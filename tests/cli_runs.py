"""The two training CLIs run in the test process, for the tests that give each fault to both.

A test takes the ``cli`` fixture (tests/conftest.py: ``"jax"`` and ``"torch"``) and runs that CLI
through ``run_main``; a run that must succeed after a failure uses ``resume_without_plots``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax_impl.train as jax_train
import torch_ref.train as torch_train
from agp_common import parse_config
from tests.npz_runs import cli_args, npz_config

#: ``main(argv) -> exit status`` of each CLI, by the ``cli`` fixture's names.
MAINS = {"jax": jax_train.main, "torch": torch_train.main}
#: ``train_and_evaluate(config, workdir=None, *, plots=True, ...)`` of each CLI, by the same names.
TRAINS = {"jax": jax_train.train_and_evaluate, "torch": torch_train.train_and_evaluate}


def records(workdir: Path, split: str | None = None) -> list[dict]:
    """The rows of ``workdir``'s metrics.jsonl in order; those of ``split`` ("train", "eval") if given."""
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return rows if split is None else [r for r in rows if r["split"] == split]


def run_main(cli: str, argv: list[str], capsys) -> tuple[int, str]:
    """``(exit status, stderr)`` of ``MAINS[cli](argv)``; argparse's exit on malformed flags included."""
    try:
        status = MAINS[cli](argv)
    except SystemExit as e:  # argparse: malformed flags
        status = e.code
    return status, capsys.readouterr().err


def resume_without_plots(cli: str, argv: list[str]) -> None:
    """Train as ``MAINS[cli](argv)`` does (the same flags, parsed the same way), without its plots.

    For the runs that must succeed, where a test reads the run folder's log at most: the CLI's plots
    cost ~1 s a run, and tests/test_run_folder.py checks them. A failure raises with its traceback.
    """
    TRAINS[cli](parse_config(argv, prog="test", framework=cli), plots=False)


def fresh_args(data: Path, workdir: Path, **changes) -> list[str]:
    """The CLI flags of ``npz_config(data, **changes)`` (by default a 2-step run on the .npz ``data``)."""
    return cli_args(npz_config(data, **changes), workdir)
