"""A tiny .npz data set and a finished run on it, driven through the JAX training CLI.

Helpers of tests/test_bad_input.py and tests/test_reliability.py; the shared
run itself is the ``template`` fixture (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import jax_impl.train as train
from agp_common import TrainConfig

# 16x16x1 images, 10 classes, batches of 8: the shapes tests/test_train.py compiles (shared jit cache).
N_TRAIN, N_TEST = 24, 4


def good_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(N_TRAIN) % 10  # every class present, so num_classes is 10
    return {"x": rng.random((N_TRAIN, 16, 16, 1), dtype=np.float32), "y": y,
            "x_test": rng.random((N_TEST, 16, 16, 1), dtype=np.float32), "y_test": np.arange(N_TEST)}


def npz_config(path: Path, **changes) -> TrainConfig:
    values = {"dataset": "npz", "data_dir": str(path), "batch_size": 8, "steps": 2, "checkpoint_every": 1,
              "eval_every": 2, "quiet": True, **changes}
    return TrainConfig(**values)


def cli_args(config: TrainConfig, workdir: Path) -> list[str]:
    return ["--dataset", config.dataset, "--data-dir", config.data_dir,
            "--batch-size", str(config.batch_size), "--steps", str(config.steps),
            "--checkpoint-every", str(config.checkpoint_every), "--eval-every", str(config.eval_every),
            "--workdir", str(workdir), "--quiet"]


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def make_template(root: Path) -> tuple[Path, Path]:
    """(data file, workdir of a finished 2-step run on it, a checkpoint at steps 1 and 2)."""
    data = write_npz(root / "data.npz", **good_arrays())
    train.train_and_evaluate(npz_config(data), root / "run", plots=False)
    return data, root / "run"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(status: int, err: str, message: str, expected_status: int = 2) -> None:
    assert status == expected_status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
