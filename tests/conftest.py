"""Fixtures shared by the modules of tests/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> tuple[Path, Path]:
    """(data file, workdir of a finished 2-step JAX run on it, checkpoints at steps 1 and 2).

    Shared by every test: use it read-only, and ``existing_run`` for a workdir to change.
    """
    from tests.npz_runs import make_template  # JAX is imported only by the tests that use it

    return make_template(tmp_path_factory.mktemp("template"))


@pytest.fixture
def existing_run(template, tmp_path) -> Path:
    """A fresh copy of the template's workdir, for a test that resumes, damages or checks it."""
    _, run = template
    return Path(shutil.copytree(run, tmp_path / "run"))
