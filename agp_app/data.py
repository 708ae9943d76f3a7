"""The datasets by name, in NumPy only (no JAX, no PyTorch): digits, CIFAR-10, npz, synthetic.

``load_dataset(config)`` loads the one ``--dataset`` names and checks it: a ``Dataset``
(``agp_app.dataset``) with NHWC images ``x`` (N, H, W, C) and integer labels ``y`` (N,) for a
train and a test split. The two generated ones are here (scikit-learn's digits, resized, and the
seeded synthetic images); the readers of files (the CIFAR-10 releases, a user's ``.npz``) are
``agp_app.data_files``. The names of both modules are importable from here too.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from agp_app.data_files import (
    CIFAR_BINARY_FILES,
    CIFAR_PYTHON_FILES,
    CIFAR_RECORD_BYTES,
    CIFAR_SUBFOLDERS,
    CIFAR_URL,
    check_npz_fits,
    find_cifar_folder,
    find_npz_file,
    load_cifar10,
    load_npz,
    npz_claimed_bytes,
    restricted_unpickle,
)
from agp_app.dataset import (
    MAX_CLASSES,
    MIN_IMAGE_SIZE,
    SPLIT_SEED,
    TEST_FRACTION,
    Dataset,
    check_labels,
    check_memory,
    check_trainable,
    fixed_split,
    physical_memory,
    validate_dataset,
    validate_split,
)
from agp_app.errors import UsageError

__all__ = [  # this module's, and those of agp_app.dataset and agp_app.data_files
    "CIFAR_BINARY_FILES", "CIFAR_PYTHON_FILES", "CIFAR_RECORD_BYTES", "CIFAR_SUBFOLDERS", "CIFAR_URL",
    "DIGITS_SIZE", "MAX_CLASSES", "MIN_IMAGE_SIZE", "SPLIT_SEED", "SYNTHETIC_NOISE", "SYNTHETIC_SIGNAL",
    "SYNTHETIC_TEMPLATE_GRID", "TEST_FRACTION", "Dataset", "check_fd_step_flag", "check_labels",
    "check_memory", "check_npz_fits", "check_trainable", "find_cifar_folder", "find_npz_file", "fixed_split",
    "linear_resize_matrix", "load_cifar10", "load_dataset", "load_digits", "load_npz", "load_synthetic",
    "npz_claimed_bytes", "physical_memory", "restricted_unpickle", "validate_dataset", "validate_split",
]

DIGITS_SIZE = 32


def linear_resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix of 1-D linear interpolation with half-pixel centres (edges clamped).

    Each row sums to 1, so a constant image stays constant; ``A @ img @ A.T``
    is bilinear resizing.
    """
    src = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    src = np.clip(src, 0, size_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    a = np.zeros((size_out, size_in))
    a[np.arange(size_out), lo] += 1 - frac
    a[np.arange(size_out), hi] += frac
    return a


def load_digits(size: int = DIGITS_SIZE) -> Dataset:
    """scikit-learn's 1,797 bundled 8x8 digits, bilinear-resized to ``size`` x ``size``, 1 channel, in [0, 1].

    Split: a fixed seeded 80/20 train/test split (1,438 / 359 examples).
    """
    from sklearn.datasets import load_digits as sklearn_digits  # bundled with scikit-learn: no download

    raw = sklearn_digits()
    images = raw.images / 16.0  # (1797, 8, 8), pixel values 0..16 -> [0, 1]
    a = linear_resize_matrix(8, size)  # (size, 8)
    x = np.einsum("hi,nij,wj->nhw", a, images, a).astype(np.float32)[..., None]  # (1797, size, size, 1)
    y = raw.target.astype(np.int32)
    train, test = fixed_split(len(y))
    return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10, value_range=(0.0, 1.0))


#: Synthetic classes differ by smooth templates drawn on this coarse grid, then resized to H x W.
SYNTHETIC_TEMPLATE_GRID = 4
#: Standard deviations of the template's pixels (the class signal) and of each image's own noise.
SYNTHETIC_SIGNAL, SYNTHETIC_NOISE = 0.4, 0.2


def load_synthetic(shape: tuple[int, int, int, int], seed: int = 0, num_classes: int = 10) -> Dataset:
    """Seeded images of shape (N, H, W, C) plus N // 5 (at least 1) test images, with learnable labels.

    Class ``k`` has a fixed template ``T_k`` (H, W, C): Gaussian values of
    standard deviation ``SYNTHETIC_SIGNAL`` on a 4 x 4 grid, bilinear-resized,
    so it is smooth and a CNN sees it through its pooling. An example of class
    ``k`` is ``clip(0.5 + T_k + noise, 0, 1)`` with i.i.d. Gaussian noise of
    standard deviation ``SYNTHETIC_NOISE`` per pixel. Labels are balanced
    (``i mod K``, shuffled), so chance accuracy is 1/K. The seed's CNN with
    its SGD recipe learns them: 256 images of 16 x 16 x 1 reach test accuracy
    1.0 within 120 steps (seed 0). Everything is drawn from ``seed`` and the
    shape, identically for both frameworks.
    """
    n, h, w, c = shape
    check_memory(f"--synthetic-shape {n},{h},{w},{c}", (n + max(1, n // 5)) * h * w * c * 4 * 2)
    rng = np.random.default_rng([seed, n, h, w, c])
    n_test = max(1, n // 5)
    g = SYNTHETIC_TEMPLATE_GRID
    coarse = rng.standard_normal((num_classes, g, g, c)) * SYNTHETIC_SIGNAL  # (K, g, g, C)
    templates = np.einsum("hi,kijc,wj->khwc", linear_resize_matrix(g, h), coarse,
                          linear_resize_matrix(g, w))  # (K, H, W, C)
    y = rng.permutation(np.arange(n + n_test) % num_classes).astype(np.int32)
    noise = rng.standard_normal((n + n_test, h, w, c), dtype=np.float32) * SYNTHETIC_NOISE
    x = np.clip(0.5 + templates[y].astype(np.float32) + noise, 0.0, 1.0)  # (N + N_test, H, W, C)
    return Dataset("synthetic", x[:n], y[:n], x[n:], y[n:], num_classes=num_classes, value_range=(0.0, 1.0))


def load_dataset(config) -> Dataset:
    """The dataset named by ``config.dataset`` (a ``TrainConfig``), validated for ``config.dtype``.

    ``config.num_classes`` (None: 10 for digits, CIFAR-10 and synthetic, inferred for .npz)
    becomes the dataset's class count; every label is checked against it.
    """
    num_classes = getattr(config, "num_classes", None)
    if config.dataset == "digits":
        ds = load_digits()
    elif config.dataset == "cifar10":
        ds = load_cifar10(config.data_dir)
    elif config.dataset == "npz":
        ds = load_npz(config.data_dir, num_classes)
    elif config.dataset == "synthetic":
        ds = load_synthetic(config.synthetic_shape, seed=config.seed, num_classes=num_classes or 10)
    else:
        raise UsageError(f"unknown dataset {config.dataset!r}")
    if num_classes is not None and ds.num_classes != num_classes:
        ds = dataclasses.replace(ds, num_classes=num_classes)
    validate_dataset(ds)
    check_trainable(ds, config.storage_dtype())  # bfloat16 runs keep the data in float32
    check_fd_step_flag(config)
    return ds


def check_fd_step_flag(config) -> None:
    """``UsageError`` when ``--penalty-approx finite_difference`` has a ``--penalty-fd-step`` too small
    for ``--dtype`` (``agp_common.penalty_spec.check_fd_step``): checked with the data, before the
    run folder is touched; the libraries would find it only when the step is traced (JAX) or never
    (a penalty of 0)."""
    if getattr(config, "penalty_approx", None) != "finite_difference":
        return
    from agp_common.penalty_spec import check_fd_step

    dtype = np.dtype(config.dtype)
    try:
        check_fd_step(config.penalty_fd_step, float(np.finfo(dtype).eps), dtype.name)
    except ValueError as e:
        raise UsageError(f"--penalty-fd-step {config.penalty_fd_step}: {e}") from None
