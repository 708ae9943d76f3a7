"""Datasets for training, in NumPy only (no JAX, no PyTorch): digits, CIFAR-10, npz, synthetic.

Every loader returns a ``Dataset`` with NHWC images ``x`` (N, H, W, C) and
integer labels ``y`` (N,) for a train and a test split. Images are kept in
their stored dtype (uint8 for CIFAR-10, float32 otherwise) and turned into
floats batch by batch: ``pixels * pixel_scale``.

Nothing here unpickles arbitrary objects: CIFAR-10's python release goes
through ``restricted_unpickle`` (plain types and NumPy arrays only) and
``.npz`` files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from agp_app.errors import UsageError

#: Seed of the fixed train/test split of digits and of .npz files without a test split:
#: independent of --seed so that test accuracies of different seeds are comparable.
SPLIT_SEED = 20240601
TEST_FRACTION = 0.2
DIGITS_SIZE = 32
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


CIFAR_BINARY_FILES = (*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin")
CIFAR_PYTHON_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32  # label byte + CHW pixels


def _read_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD_BYTES:
        raise UsageError(f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records of "
                         f"{CIFAR_RECORD_BYTES} bytes; the file is truncated or not CIFAR-10")
    records = raw.reshape(-1, CIFAR_RECORD_BYTES)
    x = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW -> (N, 32, 32, 3)
    return np.ascontiguousarray(x), records[:, 0].astype(np.int32)


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what NumPy arrays need; any other global (os.system, ...) is refused."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5 arrays
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2: codecs.encode(str, "latin1")
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only arrays and plain types")


def restricted_unpickle(data: bytes) -> Any:
    """Unpickle plain types (dict, list, str, bytes, numbers) and NumPy arrays, nothing else.

    Object arrays are refused as well, since their items could be anything.
    """
    obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()

    def check(value: Any) -> None:
        if isinstance(value, np.ndarray) and value.dtype == object:
            raise pickle.UnpicklingError("refusing an object array: only numeric arrays are allowed")
        if isinstance(value, dict):
            for v in value.values():
                check(v)
        elif isinstance(value, list | tuple):
            for v in value:
                check(v)

    check(obj)
    return obj


def _read_cifar_python(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = restricted_unpickle(path.read_bytes())
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path}: not a readable CIFAR-10 python batch ({e})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UsageError(f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW -> (N, 32, 32, 3)
    return np.ascontiguousarray(x), labels.astype(np.int32)


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
#: The subfolders the two official archives unpack into, also searched below --data-dir.
CIFAR_SUBFOLDERS = ("cifar-10-batches-bin", "cifar-10-batches-py")


def find_cifar_folder(data_dir: str | Path) -> tuple[Path, str]:
    """The folder holding a complete CIFAR-10 release under ``data_dir``, and which release it is.

    Searched: ``data_dir`` itself, then its ``cifar-10-batches-bin`` and ``cifar-10-batches-py``
    subfolders; in each, the binary release (``data_batch_1.bin`` ... ``data_batch_5.bin``,
    ``test_batch.bin``) or the python one (``data_batch_1`` ... ``data_batch_5``, ``test_batch``).
    Otherwise a ``UsageError`` that says where to download CIFAR-10 and how to unpack it, and which
    files a partly filled folder lacks.
    """
    root = Path(data_dir)
    candidates = [root, *(root / sub for sub in CIFAR_SUBFOLDERS)]
    partial = []  # (files present, folder, release, missing files)
    for folder in candidates:
        for kind, files in (("binary", CIFAR_BINARY_FILES), ("python", CIFAR_PYTHON_FILES)):
            missing = [f for f in files if not (folder / f).is_file()]
            if not missing:
                return folder, kind
            if len(missing) < len(files):
                partial.append((len(files) - len(missing), str(folder), kind, missing))
    found = ""
    if partial:
        _, folder, kind, missing = max(partial)
        found = f"; {folder} holds part of the {kind} release but lacks {', '.join(missing)}"
    binary, python = (root / sub for sub in CIFAR_SUBFOLDERS)
    raise UsageError(
        f"--data-dir {root}: no complete CIFAR-10 release found (looked in "
        f"{', '.join(str(c) for c in candidates)}{found}); download the \"CIFAR-10 binary version\" "
        f"(cifar-10-binary.tar.gz) or \"CIFAR-10 python version\" (cifar-10-python.tar.gz) from {CIFAR_URL} "
        f"and unpack it with 'tar xzf <archive> -C {root}': the binary one gives {binary}/"
        f"{CIFAR_BINARY_FILES[0]} ... {CIFAR_BINARY_FILES[-2]}, {CIFAR_BINARY_FILES[-1]}; the python one "
        f"{python}/{CIFAR_PYTHON_FILES[0]} ... {CIFAR_PYTHON_FILES[-2]}, {CIFAR_PYTHON_FILES[-1]}"
    )


def load_cifar10(data_dir: str | Path) -> Dataset:
    """The official CIFAR-10 release (binary or python) from ``data_dir``: 50,000 / 10,000 uint8 images."""
    folder, kind = find_cifar_folder(data_dir)
    read = _read_cifar_binary if kind == "binary" else _read_cifar_python
    files = CIFAR_BINARY_FILES if kind == "binary" else CIFAR_PYTHON_FILES
    parts = [read(folder / f) for f in files]
    x_train = np.concatenate([p[0] for p in parts[:-1]])
    y_train = np.concatenate([p[1] for p in parts[:-1]])
    return Dataset("cifar10", x_train, y_train, *parts[-1], num_classes=10, pixel_scale=1 / 255,
                   value_range=(0.0, 1.0))


def find_npz_file(data_dir: str | Path) -> Path:
    """``data_dir`` itself if it is a file, else the single ``.npz`` inside the folder."""
    if not str(data_dir).strip():
        raise UsageError("--data-dir is empty; expected an .npz file or a folder holding one")
    path = Path(data_dir)
    if path.is_file():
        return path
    if path.exists() and not path.is_dir():  # a FIFO would block the read, a device never end it
        raise UsageError(f"--data-dir {path}: not a regular file (a FIFO, device or socket); expected an "
                         ".npz file or a folder holding one")
    if not path.is_dir():
        raise UsageError(f"--data-dir {path}: no such file or folder; expected an .npz file or a folder "
                         "holding one")
    found = sorted(path.glob("*.npz"))
    if len(found) != 1:
        raise UsageError(f"--data-dir {path}: expected exactly one .npz file in the folder, found "
                         f"{[p.name for p in found]}")
    return found[0]


def npz_claimed_bytes(npz: np.lib.npyio.NpzFile) -> int:
    """Bytes the arrays of ``npz`` claim in their ``.npy`` headers (shape x item size), read
    without loading any array: a header may claim terabytes in a file of a few hundred bytes,
    and ``np.load`` would try to allocate them. ``ValueError`` for a header that is not one."""
    total = 0
    for name in npz.zip.namelist():
        with npz.zip.open(name) as member:
            try:
                version = np.lib.format.read_magic(member)
            except ValueError:  # not an .npy member: np.load hands it over as its bytes
                total += npz.zip.getinfo(name).file_size
                continue
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(member)
        total += int(np.prod(shape, dtype=object)) * dtype.itemsize
    return total


def check_npz_fits(path: Path, claimed: int) -> None:
    """``UsageError`` before loading when the arrays of ``path`` claim more bytes than the memory."""
    total = physical_memory()
    if total is not None and claimed > total:
        raise UsageError(f"{path}: its arrays' headers declare {claimed / 2**30:.3g} GiB, more than this "
                         f"machine's {total / 2**30:.3g} GiB of memory; expected an .npz whose arrays fit "
                         "in memory (the file may be damaged)")


def load_npz(data_dir: str | Path, num_classes: int | None = None) -> Dataset:
    """A user's ``x`` (N, H, W, C) and ``y`` (N,) from an .npz file (no pickles).

    Optional ``x_test``/``y_test`` give the test split; otherwise a fixed seeded
    20% of the examples is held out. Pixels are used as stored (cast to float).
    ``num_classes``: every label must be in ``[0, num_classes)``; ``None``: it is
    inferred as ``max(y) + 1`` (at least 2), and a label of ``MAX_CLASSES`` or more is refused.
    """
    path = find_npz_file(data_dir)
    try:
        # Our own handle: np.load leaks its file when the zip is truncated.
        with open(path, "rb") as handle:
            f = np.load(handle, allow_pickle=False)
            if not isinstance(f, np.lib.npyio.NpzFile):  # a plain .npy array
                raise UsageError(f"{path}: a single .npy array, not an .npz archive; expected an .npz "
                                 "holding 'x' (N, H, W, C) and 'y' (N,), as np.savez(path, x=x, y=y) writes")
            with f:
                check_npz_fits(path, npz_claimed_bytes(f))
                arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated, corrupt, pickle
        raise UsageError(f"{path}: not a readable .npz file without pickles ({type(e).__name__}: {e})"
                         ) from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise UsageError(f"{path}: missing array(s) {missing}; expected 'x' (N, H, W, C) and 'y' (N,), "
                         f"found {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    validate_split(x, y, f"{path} (x, y)", num_classes)
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise UsageError(f"{path}: give both 'x_test' and 'y_test' or neither")
    if "x_test" in arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
        validate_split(x_test, y_test, f"{path} (x_test, y_test)", num_classes)
        x_train, y_train = x, y
    else:
        if len(y) < 2:
            raise UsageError(f"{path}: need at least 2 examples to hold out a test split, got {len(y)}")
        train, test = fixed_split(len(y))
        x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    if num_classes is None:
        num_classes = max(int(max(y_train.max(), y_test.max())) + 1, 2)
    return Dataset("npz", x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32),
                   num_classes=num_classes)


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
