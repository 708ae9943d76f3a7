"""The ``Dataset`` type every loader returns, and the checks every dataset passes, in NumPy only.

A ``Dataset`` holds NHWC images ``x`` (N, H, W, C) and integer labels ``y`` (N,) for a train
and a test split. Images are kept in their stored dtype (uint8 for CIFAR-10, float32 otherwise)
and turned into floats batch by batch: ``pixels * pixel_scale``. ``validate_dataset`` checks the
shapes, values and labels of both splits; ``check_trainable`` that the pixels fit the training
dtype; ``check_memory`` that a dataset fits the machine before it is allocated. The loaders are
``agp_app.data`` (by name: ``load_dataset``) and ``agp_app.data_files`` (CIFAR-10, .npz).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any

import numpy as np

from agp_app.errors import UsageError

#: Seed of the fixed train/test split of digits and of .npz files without a test split:
#: independent of --seed so that test accuracies of different seeds are comparable.
SPLIT_SEED = 20240601
TEST_FRACTION = 0.2
#: The model's two conv5x5 + pool2 stages need at least this many pixels per side.
MIN_IMAGE_SIZE = 16
#: Most classes a dataset may have (``--num-classes``, or inferred as max(label) + 1): one stray
#: label of 10^9 would otherwise ask for a classifier with 10^9 outputs.
MAX_CLASSES = 10_000


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split: ``x_*`` (N, H, W, C), ``y_*`` (N,) int, ``num_classes`` K."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    pixel_scale: float = 1.0
    #: Valid range (lo, hi) of the scaled pixels, where the loader knows it; None: see ``input_range``.
    value_range: tuple[float, float] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one example."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def input_range(self) -> tuple[float, float]:
        """(lo, hi) of valid inputs after ``pixel_scale``, the box adversarial examples are clipped to.

        digits, CIFAR-10 and synthetic: [0, 1] (``value_range``). Others (.npz):
        the smallest and largest pixel of both splits times ``pixel_scale``, so an
        attack never leaves the range the data occupies (hi = lo + 1 if all pixels are equal).
        """
        if self.value_range is not None:
            return self.value_range
        lo = float(min(self.x_train.min(), self.x_test.min())) * self.pixel_scale
        hi = float(max(self.x_train.max(), self.x_test.max())) * self.pixel_scale
        return (lo, hi) if hi > lo else (lo, lo + 1.0)

    @functools.cached_property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the four arrays' dtypes, shapes and bytes and of ``pixel_scale``.

        Stored in config.json and every checkpoint: a run resumes only on the data it began on,
        wherever that file now lives. Cost: one pass over the data (about 0.3 s for CIFAR-10).
        """
        digest = hashlib.sha256(repr(self.pixel_scale).encode())
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).data)
        return "sha256:" + digest.hexdigest()

    def info(self) -> dict[str, Any]:
        """JSON-ready summary for config.json."""
        return {"name": self.name, "train_examples": len(self.y_train), "test_examples": len(self.y_test),
                "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                "fingerprint": self.fingerprint}


def check_labels(y: np.ndarray, where: str, num_classes: int | None = None) -> None:
    """``UsageError`` naming the first label outside ``[0, num_classes)`` and its index.

    ``num_classes=None``: the count is to be inferred as max(y) + 1, so labels must be
    in ``[0, MAX_CLASSES)``.
    """
    bound = num_classes if num_classes is not None else MAX_CLASSES
    bad = np.flatnonzero((y < 0) | (y >= bound))
    if not len(bad):
        return
    i = int(bad[0])
    found = f"found values from {y.min()} to {y.max()} (the first bad one: y[{i}] = {y[i]})"
    if num_classes is not None:
        raise UsageError(f"{where}: labels must be in [0, {num_classes}), {found}; fix the labels or "
                         "--num-classes")
    if y[i] < 0:
        raise UsageError(f"{where}: labels must be >= 0, {found}")
    raise UsageError(f"{where}: labels must be in [0, {MAX_CLASSES}) to infer the number of classes as "
                     f"max(label) + 1, {found}; fix the label, or give --num-classes to check them against")


def validate_split(x: np.ndarray, y: np.ndarray, where: str, num_classes: int | None = None) -> None:
    """Raise ``UsageError`` unless ``x`` is (N, H, W, C) finite numbers and ``y`` is N labels in [0, K)."""
    if x.ndim != 4:
        raise UsageError(f"{where}: expected images of shape (N, H, W, C), got shape {x.shape}")
    if y.ndim != 1:
        raise UsageError(f"{where}: expected labels of shape (N,), got shape {y.shape}")
    if len(x) != len(y):
        raise UsageError(f"{where}: {len(x)} images but {len(y)} labels; expected the same number")
    if len(x) == 0:
        raise UsageError(f"{where}: the dataset is empty; expected at least one example")
    if x.shape[3] == 0:
        raise UsageError(f"{where}: images have 0 channels (shape {x.shape}); expected at least one")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UsageError(f"{where}: expected numeric images, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise UsageError(f"{where}: images contain NaN or Inf; expected finite values")
    if not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"{where}: expected integer class labels, got dtype {y.dtype}")
    check_labels(y, where, num_classes)
    h, w = x.shape[1:3]
    if h < MIN_IMAGE_SIZE or w < MIN_IMAGE_SIZE:
        raise UsageError(f"{where}: images must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} for the CNN, "
                         f"got {h}x{w}")


def validate_dataset(ds: Dataset) -> Dataset:
    """``validate_split`` on both splits, and the same image shape in both."""
    validate_split(ds.x_train, ds.y_train, f"{ds.name} train split", ds.num_classes)
    validate_split(ds.x_test, ds.y_test, f"{ds.name} test split", ds.num_classes)
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise UsageError(f"{ds.name}: train images are {ds.x_train.shape[1:]} but test images are "
                         f"{ds.x_test.shape[1:]}; expected the same (H, W, C)")
    return ds


def check_trainable(ds: Dataset, dtype: str | np.dtype, where: str = "") -> None:
    """``UsageError`` unless every pixel times ``pixel_scale`` is finite in ``dtype``, the training dtype.

    float64 data near 1e300 passes the finiteness check of ``validate_split`` but becomes Inf
    when cast to float32 for training.
    """
    dtype = np.dtype(dtype)
    limit = float(np.finfo(dtype).max)
    for name, x in (("train", ds.x_train), ("test", ds.x_test)):
        if x.size == 0:
            continue
        largest = max(abs(float(x.min())), abs(float(x.max()))) * ds.pixel_scale
        if largest > limit:
            raise UsageError(f"{where or ds.name} {name} split: pixel values up to {largest:.3g} overflow "
                             f"{dtype} (largest {limit:.3g}); rescale the data or train with --dtype float64")


def fixed_split(n: int, test_fraction: float = TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of a seeded permutation of ``range(n)``; at least one of each."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def physical_memory() -> int | None:
    """Bytes of RAM of this machine, where the OS tells (Linux, macOS); else None."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(what: str, needed: int) -> None:
    """``UsageError`` when ``what`` needs more bytes than the machine's memory (before allocating it)."""
    total = physical_memory()
    if total is not None and needed > total:
        raise UsageError(f"{what} needs about {needed / 2**30:.3g} GiB, more than this machine's "
                         f"{total / 2**30:.3g} GiB of memory; choose smaller sizes")
